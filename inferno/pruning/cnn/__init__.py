"""CNN structured pruning: ``surgery`` (channel removal through Torch-Pruning's dependency graph), ``uniform``."""
