"""Structured channel surgery on any CNN through Torch-Pruning's dependency graph.

Importance (what to score) is chosen by name; the dependency graph keeps residual adds, SE gates and
BatchNorms consistent and physically shrinks every coupled layer, so MACs and latency fall.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from inferno.errors import ConfigError

IMPORTANCES = ("l1", "l2", "taylor", "random")


def importance(name: str):
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"pruner.importance: unknown importance {name!r}; allowed: {', '.join(IMPORTANCES)}")


def check_ratio(ratio: float, key: str = "pruner.ratios") -> float:
    if not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"{key}: ratio {ratio} is outside [0, 1)")
    return float(ratio)


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float | None = None,
    ratio_dict: dict[nn.Module, float] | None = None,
    importance_name: str = "l1",
    ignored: list[nn.Module] | None = None,
    calib_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (or per-layer ratios in ``ratio_dict``),
    lowest importance first, in place. ``ignored`` defaults to the model's ``head`` (the class outputs).
    Taylor importance needs ``calib_batch`` = (inputs, labels) for one backward pass."""
    check_ratio(ratio or 0.0)
    imp = importance(importance_name)
    if ignored is None:
        ignored = [model.head] if hasattr(model, "head") else []
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio or 0.0,
        pruning_ratio_dict=ratio_dict,
        ignored_layers=ignored,
        global_pruning=False,
    )
    if isinstance(imp, tp.importance.TaylorImportance):
        if calib_batch is None:
            raise ConfigError("pruner.importance: taylor needs a calibration batch of (inputs, labels)")
        model.zero_grad()
        F.cross_entropy(model(calib_batch[0]), calib_batch[1]).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model
