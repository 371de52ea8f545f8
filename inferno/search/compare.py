"""``pruner=compare``: several pruners in one run, sharing the trained start model, the task and the
tracker, in the order given, so that later ones can match earlier ones' training cost
(``random_sampling``'s ``match.method``) and every method lands in one ``points.csv`` and one curve."""

from __future__ import annotations

from omegaconf import DictConfig


class Compare:
    method = "compare"

    def __init__(self, methods: DictConfig, budget: DictConfig | None = None):
        self.methods = methods  # ``budget`` is only the value the methods' configs interpolate

    def run(self, ctx) -> None:
        from inferno.config import build_node

        for key, node in self.methods.items():
            if node is None:  # a method switched off with pruner.methods.KEY=null
                continue
            ctx.log(f"compare: {key}")
            build_node(node, "pruner").run(ctx)
