"""Structured channel surgery on any CNN through Torch-Pruning's dependency graph.

Importance (what to score) is chosen by name; the dependency graph groups every channel that must go
together (a conv's filters, its BatchNorm, the consumers' input channels, residual adds, SE gates) and
physically shrinks every coupled layer, so MACs and latency fall. ``prune_channels`` returns which
channels each group kept, so weight transfer can be checked channel by channel.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# The layers whose output channels root a channel group (1-D convolutions too: temporal models).
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
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


# ----------------------------------------------------------------------------------- channel groups
@dataclass
class ChannelGroup:
    """One dependency-graph group: every layer that must lose a channel together with the ``root``'s output
    channel ``j``. ``producers`` compute the channel (their output channel ``idxs[j]``: the root, the other
    convolutions added to it at residual adds, ...), ``consumers`` read it (their input channel ``idxs[j]``);
    ``(name, module, idxs)`` each, ``idxs`` aligned with the root's channels."""

    root: str
    producers: list[tuple[str, nn.Module, list[int]]]
    consumers: list[tuple[str, nn.Module, list[int]]]

    @property
    def size(self) -> int:
        return len(self.producers[0][2])


def channel_groups(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module] | None = None):
    """``(graph, groups)``: Torch-Pruning's dependency graph of ``model`` and every prunable channel group
    (roots: convolutions and linears other than ``ignored``, default the model's ``head``) as ``ChannelGroup``s."""
    if ignored is None:
        ignored = [model.head] if hasattr(model, "head") else []
    names = {m: n for n, m in model.named_modules()}
    with torch.enable_grad():  # the graph is traced through autograd, also when called under no_grad
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    out = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        producers, consumers, seen = [], [], set()
        for dep, idxs in group:
            layer, fn = dep.target.module, dep.handler.__name__
            if not isinstance(layer, WEIGHTED) or (layer, fn) in seen:
                continue
            seen.add((layer, fn))
            entry = (names[layer], layer, [int(i) for i in idxs])
            (producers if fn == "prune_out_channels" else consumers).append(entry)
        if producers:
            out.append(ChannelGroup(names[group[0].dep.target.module], producers, consumers))
    return graph, out


def remove_channels(model: nn.Module, example: torch.Tensor, plan: dict[str, list[int]],
                    ignored: list[nn.Module] | None = None) -> int:
    """Physically remove, in place, the output channels ``plan[root]`` of every named root layer together with
    every coupled layer's channels (Torch-Pruning's dependency graph: consumers' inputs, residual partners, SE
    gates); returns the number of parameters removed. Channels are given in the root's current indexing."""
    before = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = []
    for root, idxs in plan.items():
        if idxs:
            layer = modules[root]
            handler = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            groups.append(graph.get_pruning_group(layer, handler, sorted(int(i) for i in idxs)))
    for group in groups:  # every group is built on the unpruned graph first: groups never share a channel
        group.prune()
    model.zero_grad(set_to_none=True)
    return before - sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- BatchNorm folding
def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where a BatchNorm reads the output of a convolution and nothing else does,
    found on the model's ``torch.fx`` graph (any family whose forward traces)."""
    from torch import fx

    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every inference-mode BatchNorm into the convolution before it, in place: the conv gets
    ``W * gamma / sqrt(var + eps)`` and the bias ``beta + (b - mean) * gamma / sqrt(var + eps)``
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``), the BatchNorm becomes ``nn.Identity``. The model's
    class and module names stay, so a folded network is rebuilt by building the family and folding it again.
    Returns the folded ``(conv, bn)`` pairs."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = conv_bn_pairs(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            conv.weight, conv.bias = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
            parent, _, attr = bn_name.rpartition(".")
            setattr(modules[parent] if parent else model, attr, nn.Identity())
    return pairs
