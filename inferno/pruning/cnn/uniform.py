"""``pruner=uniform``: the same structured channel ratio in every prunable layer, L1 (or L2/Taylor)
importance, each child fine-tuned briefly from the dense parent's weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from inferno.pruning.cnn.surgery import check_ratio, prune_channels


class UniformPruner:
    method = "uniform"

    def __init__(self, ratios: Sequence[float] = (0.25, 0.5, 0.75), importance: str = "l1", finetune_epochs: int = 2):
        self.ratios = [check_ratio(r) for r in ratios]
        self.importance = importance
        self.finetune_epochs = finetune_epochs

    def run(self, ctx) -> None:
        dense, dense_cost = ctx.dense()
        example = ctx.example()
        for step, ratio in enumerate(ctx.progress(self.ratios, desc="uniform ratios"), start=1):
            child = copy.deepcopy(dense)
            prune_channels(child, example, ratio, self.importance, calib_batch=ctx.calib_batch())
            cost = dense_cost.copy()
            ctx.finetune(child, self.finetune_epochs, cost)
            ctx.record(self.method, step, child, cost, extra={"ratio": ratio})
