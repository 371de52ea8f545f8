"""``pruner=uniform``: structured channel pruning by Torch-Pruning's own pruner (``tp.pruner.BasePruner``; ``MetaPruner``
in older releases, still its alias), the standard structured-pruning baseline for CNNs.

For every ratio in ``ratios`` a child is pruned from the trained start model (``ctx.dense()``): Torch-Pruning's
dependency graph groups every channel that must go together (a conv's filters, its BatchNorm, the consumers'
input channels, residual adds, SE gates), ``importance`` scores each group's channels, and

* ``global_pruning=false`` (the ``uniform`` baseline): each group loses ``ratio`` of its channels, its own
  lowest-scoring ones (Torch-Pruning's rule: ``n - int(n * (1 - ratio))`` of ``n``);
* ``global_pruning=true`` (``variant`` column ``global``): the scores of every group are ranked together and the
  lowest ``ratio`` of all channels go, so layers end up with different ratios (same total).

``iterative_steps`` > 1 reaches the ratio in that many equal steps (Torch-Pruning's linear schedule), the child
fine-tuned ``step_epochs`` after every step but the last and ``finetune_epochs`` after the last. ``round_to``
rounds every group's kept channels down to a multiple (a group that would keep none is left whole). The head (the
class outputs) is never pruned. ``taylor`` scores need gradients: before every step the child accumulates them
(eval mode, no weight update) on the first ``taylor_samples`` training examples; those examples count in the
child's training cost like the fine-tuning ones do.

One point per ratio (``phase=final``; with ``record_steps`` also one after every intermediate step,
``phase=step``), extra columns ``ratio`` (the child's target), ``step_ratio`` (that step's scheduled ratio),
``importance``, ``global_pruning``, ``steps``, ``prune_step``, ``channel_ratio`` (fraction of the prunable
channels actually removed), ``layer_ratios`` (the same per group, by root layer) and ``grad_samples``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError, check_bool, check_choice, check_int
from inferno.pruning.cnn.surgery import IMPORTANCES, check_ratio, importance
from inferno.tracking import HIGHER_IS_BETTER
from inferno.training import check_epochs

# ``BasePruner`` in current Torch-Pruning (``MetaPruner`` stays as its alias); the older name where it is the only one
TorchPruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner


def check_ratios(ratios, key: str = "pruner.ratios") -> list[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
        raise ConfigError(f"{key}: {ratios!r} must be a non-empty list of ratios in [0, 1)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ConfigError(f"{key}: ratio {r!r} is not a number; ratios are in [0, 1)")
    return [check_ratio(r, key) for r in ratios]


class ChannelPruner:
    """One Torch-Pruning pruner on ``model`` (pruned in place), step by step, keeping track of which of the
    original channels of every group are still there (``kept``: root layer name -> original indices)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ratio: float, importance_name: str = "l1",
                 global_pruning: bool = False, iterative_steps: int = 1, round_to: int | None = None,
                 ignored: list[nn.Module] | None = None):
        if ignored is None:
            ignored = [model.head] if hasattr(model, "head") else []
        self.model = model
        self.importance = importance_name
        self.pruner = TorchPruner(
            model, example, importance=importance(importance_name), global_pruning=global_pruning,
            pruning_ratio=ratio, iterative_steps=iterative_steps, round_to=round_to, ignored_layers=ignored,
            # fresh dicts: Torch-Pruning's defaults for these are shared mutable objects it writes into
            in_channel_groups={}, out_channel_groups={}, num_heads={},
        )
        self.names = {m: n for n, m in model.named_modules()}
        graph = self.pruner.DG
        self.initial = {}  # root layer name -> its group's channels before any pruning
        for group in graph.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                          root_module_types=self.pruner.root_module_types):
            root = group[0].dep.target.module
            self.initial[self.names[root]] = graph.get_out_channels(root)
        self.kept = {name: list(range(n)) for name, n in self.initial.items()}
        self.steps_done = 0

    @property
    def steps(self) -> int:
        return self.pruner.iterative_steps

    def step_ratio(self, k: int | None = None) -> float:
        """The scheduled ratio after step ``k`` (default: the steps done so far)."""
        return float(self.pruner.per_step_pruning_ratio[self.steps_done if k is None else k])

    def step(self) -> dict[str, list[int]]:
        """Prune the next step (gradients must be in place for ``taylor``); returns ``kept``."""
        if self.steps_done >= self.steps:
            raise RuntimeError(f"all {self.steps} pruning steps are done")
        for group in self.pruner.step(interactive=True):
            dep, idxs = group[0]
            name = self.names[dep.target.module]
            drop = {int(i) for i in idxs}
            kept = self.kept.setdefault(name, list(range(self.pruner.DG.get_out_channels(dep.target.module))))
            self.kept[name] = [c for j, c in enumerate(kept) if j not in drop]
            group.prune()
        self.steps_done += 1
        self.model.zero_grad(set_to_none=True)
        return self.kept

    def layer_ratios(self) -> dict[str, float]:
        """Fraction of every group's original channels removed so far."""
        return {name: 1.0 - len(self.kept[name]) / n for name, n in self.initial.items()}

    def channel_ratio(self) -> float:
        """Fraction of all prunable channels (every group's, summed) removed so far."""
        total = sum(self.initial.values())
        return 1.0 - sum(len(self.kept[name]) for name in self.initial) / total if total else 0.0


def accumulate_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> int:
    """Cross-entropy gradients of ``model`` summed over ``inputs`` in batches (eval mode: BatchNorm statistics
    untouched, no weight update); returns the number of examples used."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for i in range(0, len(inputs), batch_size):
            F.cross_entropy(model(inputs[i:i + batch_size]), labels[i:i + batch_size]).backward()
    model.train(was_training)
    return len(inputs)


class UniformPruner:
    """See the module docstring. Every option is checked here, before anything trains."""

    def __init__(self, ratios: Sequence[float] = (0.25, 0.5, 0.75), importance: str = "l1",
                 finetune_epochs: float = 2, global_pruning: bool = False, iterative_steps: int = 1,
                 step_epochs: float = 1, round_to: int | None = None, taylor_samples: int = 256,
                 record_steps: bool = False, method: str = "uniform", variant: str | None = None):
        self.ratios = check_ratios(ratios)
        self.importance = check_choice("pruner.importance", importance, IMPORTANCES, "importance")
        self.finetune_epochs = check_epochs("pruner.finetune_epochs", finetune_epochs)
        self.global_pruning = check_bool("pruner.global_pruning", global_pruning)
        self.iterative_steps = check_int("pruner.iterative_steps", iterative_steps, 1)
        self.step_epochs = check_epochs("pruner.step_epochs", step_epochs)
        self.round_to = check_int("pruner.round_to", round_to, 1, allow_none=True, hint=" (channels kept per group "
                                  "are rounded down to a multiple of it)")
        self.taylor_samples = check_int("pruner.taylor_samples", taylor_samples, 1)
        self.record_steps = check_bool("pruner.record_steps", record_steps)
        if not isinstance(method, str) or not method:
            raise ConfigError(f"pruner.method: {method!r} must be a non-empty name (the points' method column)")
        if variant is not None and not isinstance(variant, str):
            raise ConfigError(f"pruner.variant: {variant!r} must be a string or null")
        self.method = method
        self.variant = variant if variant is not None else ("global" if global_pruning else None)

    @property
    def label(self) -> str:
        """The key of this method's results in the run (``ctx.results``): ``uniform``, ``uniform[global]``."""
        return self.method if not self.variant else f"{self.method}[{self.variant}]"

    def prune(self, model: nn.Module, example: torch.Tensor, ratio: float) -> ChannelPruner:
        return ChannelPruner(model, example, ratio, self.importance, self.global_pruning, self.iterative_steps,
                             self.round_to)

    def run(self, ctx) -> None:
        dense, dense_cost = ctx.dense()
        example = ctx.example()
        batch_size = int(getattr(ctx.task, "batch_size", 64))
        finals, spent = [], TrainingCost()  # spent: every child's own training (the start model's not included)
        n_point = 0
        for i, ratio in enumerate(ctx.progress(self.ratios, desc=f"{self.label} ratios"), start=1):
            child, cost = copy.deepcopy(dense), dense_cost.copy()
            pruner = self.prune(child, example, ratio)
            grad_samples = 0
            for k in range(1, self.iterative_steps + 1):
                if self.importance == "taylor":
                    used = accumulate_gradients(child, *ctx.calib_batch(self.taylor_samples), batch_size)
                    cost.add(used, ctx.macs(child))
                    grad_samples += used
                pruner.step()
                last = k == self.iterative_steps
                ctx.finetune(child, self.finetune_epochs if last else self.step_epochs, cost)
                if not (last or self.record_steps):
                    continue
                n_point += 1
                extra = {"phase": "final" if last else "step", "ratio": ratio, "step_ratio": round(pruner.step_ratio(), 6),
                         "importance": self.importance, "global_pruning": self.global_pruning,
                         "steps": self.iterative_steps, "prune_step": k,
                         "channel_ratio": round(pruner.channel_ratio(), 6),
                         "layer_ratios": json.dumps({n: round(r, 4) for n, r in pruner.layer_ratios().items()}),
                         "grad_samples": grad_samples}
                if self.variant:
                    extra["variant"] = self.variant
                point = ctx.record(self.method, n_point if self.record_steps else i, child, cost, extra=extra)
                if last:
                    finals.append(point)
            whole = [n for n, r in pruner.layer_ratios().items() if r == 0 and pruner.initial[n] > 1]
            if ratio > 0 and whole and not self.global_pruning:  # Torch-Pruning keeps int(n * (1 - ratio)) channels
                ctx.log(f"{self.label}: at ratio {ratio} Torch-Pruning left {len(whole)} group(s) whole "
                        f"(too few channels to keep any): {', '.join(whole)}")
            spent.samples += cost.samples - dense_cost.samples
            spent.macs += cost.macs - dense_cost.macs
        sign = 1.0 if HIGHER_IS_BETTER.get(finals[0].metric, True) else -1.0
        best = max(finals, key=lambda p: sign * p.value)
        ctx.results[self.label] = {
            "value": best.value, "ratio": best.extra["ratio"], "search_samples": spent.samples,
            "search_macs": spent.macs, "train_samples": dense_cost.samples + spent.samples,
            "train_macs": dense_cost.macs + spent.macs}

    def objective(self, ctx) -> float | None:
        """The best final test quality over the ratios (what the run returns to a sweeper)."""
        return (ctx.results.get(self.label) or {}).get("value")
