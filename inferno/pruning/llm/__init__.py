"""LLM calibration pruning: ``runner`` (the one sequential calibration runner), ``methods`` (the method
interface and the unstructured methods), ``masks``/``scores``/``sparsegpt`` (their machinery), ``surgery``
(physically removing heads and neurons), ``pruner`` (the Hydra-facing ``LLMPruner``)."""
