"""Structured channel surgery on any CNN through Torch-Pruning's dependency graph.

Importance (what to score) is chosen by name; the dependency graph groups every channel that must go
together (a conv's filters, its BatchNorm, the consumers' input channels, residual adds, SE gates) and
physically shrinks every coupled layer, so MACs and latency fall. ``prune_channels`` returns which
channels each group kept, so weight transfer can be checked channel by channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from inferno.errors import ConfigError, check_choice

# l1 / l2: Torch-Pruning's group magnitude (every coupled layer's slice of a channel: the conv's filter, its
# BatchNorm scale, the consumers' input columns; averaged over the layers, divided by the group's mean).
# group_norm: Torch-Pruning's GroupMagnitudeImportance(p=2), DepGraph's group norm, the name its benchmarks use
# (in the pinned Torch-Pruning 1.6 MagnitudeImportance is an alias of it, so it ranks exactly like l2).
# filter_l1 / filter_l2: the root conv's filter norm alone (Li et al. 2017), the rest of the group ignored.
# taylor: |w * dL/dw| per channel, averaged over the group's layers (needs gradients); random: random scores.
IMPORTANCES = ("l1", "l2", "group_norm", "filter_l1", "filter_l2", "taylor", "random")


def importance(name: str):
    check_choice("pruner.importance", name, IMPORTANCES, "importance")
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "group_norm":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name in ("filter_l1", "filter_l2"):
        return tp.importance.GroupMagnitudeImportance(p=int(name[-1]), group_reduction="first")
    if name == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.RandomImportance()  # "random"


def check_ratio(ratio: float, key: str = "pruner.ratios") -> float:
    if not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"{key}: ratio {ratio} is outside [0, 1)")
    return float(ratio)


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    importance_name: str = "l1",
    ignored: list[nn.Module] | None = None,
    scope: nn.Module | None = None,
    calib_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, list[int]]:
    """Remove ``ratio`` of the channels of every prunable channel group (``int(n * ratio)`` of its ``n``),
    lowest importance first, in place, and return ``{root layer name: kept channel indices}``.

    ``scope`` restricts pruning to the groups whose root layer lies inside that module (e.g. one stage).
    ``ignored`` defaults to the model's ``head`` (the class outputs). Taylor importance needs
    ``calib_batch`` = (inputs, labels) for one backward pass."""
    check_ratio(ratio)
    imp = importance(importance_name)
    if ignored is None:
        ignored = [model.head] if hasattr(model, "head") else []
    names = {m: n for n, m in model.named_modules()}
    inside = set(scope.modules()) if scope is not None else None
    if isinstance(imp, tp.importance.TaylorImportance):
        if calib_batch is None:
            raise ConfigError("pruner.importance: taylor needs a calibration batch of (inputs, labels)")
        model.zero_grad()
        with torch.enable_grad():
            F.cross_entropy(model(calib_batch[0]), calib_batch[1]).backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    plans = []  # score every group on the unpruned model first, then cut
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        if inside is not None and root not in inside:
            continue
        with torch.no_grad():
            scores = imp(group)
        if scores is None or int(len(scores) * ratio) == 0:
            continue
        order = torch.argsort(scores, descending=True, stable=True)
        n_keep = len(scores) - int(len(scores) * ratio)
        plans.append((root, fn, order[n_keep:].sort().values.tolist(), order[:n_keep].sort().values.tolist()))
    kept = {}
    for root, fn, drop, keep in plans:
        group = graph.get_pruning_group(root, fn, drop)
        if graph.check_pruning_group(group):
            group.prune()
            kept[names[root]] = keep
    model.zero_grad(set_to_none=True)
    return kept
