"""Unstructured weight masks on CNNs, shared by the methods that prune weights one by one (DNNShifter's iterative
magnitude pruning, Reconvene's pruning-at-initialization scores).

Masks are applied with ``torch.nn.utils.prune.custom_from_mask``: the layer's ``weight`` becomes
``weight_orig * weight_mask`` on every forward, so a masked weight stays zero through any number of optimizer
steps (its gradient is zero too), and ``make_permanent`` folds the mask into a plain ``weight`` again (before
saving, surgery or counting). A mask is a bool tensor of the weight's shape, True where the weight is kept.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(net: nn.Module, include_head: bool = True) -> dict[str, nn.Module]:
    """``{name: layer}`` of every convolution and linear of ``net`` (in registration order); without the
    model's ``head`` (its class outputs) when ``include_head`` is false."""
    head = getattr(net, "head", None)
    skip = set(head.modules()) if (head is not None and not include_head) else set()
    return {n: m for n, m in net.named_modules() if isinstance(m, PRUNABLE_TYPES) and m not in skip}


def is_masked(layer: nn.Module) -> bool:
    return hasattr(layer, "weight_mask")


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The layer's effective weight (``weight_orig * weight_mask`` while a mask is applied)."""
    return (layer.weight_orig * layer.weight_mask) if is_masked(layer) else layer.weight


def current_masks(net: nn.Module, layers: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The mask of every prunable layer: its applied mask, else its non-zero weights."""
    layers = prunable_layers(net) if layers is None else layers
    return {n: (m.weight_mask.detach().bool() if is_masked(m) else m.weight.detach() != 0) for n, m in layers.items()}


def apply_masks(net: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Mask the named layers' weights (replacing any mask they had); the masked weights are zero from now on."""
    modules = dict(net.named_modules())
    for name, mask in masks.items():
        layer = modules[name]
        mask = mask.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if is_masked(layer):
            layer.weight_mask.copy_(mask)
        else:
            prune.custom_from_mask(layer, "weight", mask)


def make_permanent(net: nn.Module) -> nn.Module:
    """Fold every applied mask into a plain ``weight`` (zeros where masked); returns ``net``."""
    for m in net.modules():
        if is_masked(m):
            prune.remove(m, "weight")
    return net


def copy_net(net: nn.Module) -> nn.Module:
    """A deep copy that also works on a masked net after a forward (its ``weight`` is then a non-leaf tensor,
    which deepcopy refuses): the masked weights are recomputed detached first, with the same values."""
    for m in net.modules():
        if is_masked(m):
            m.weight = (m.weight_orig * m.weight_mask).detach()
    return copy.deepcopy(net)


def kept_count(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def total_count(masks: dict[str, torch.Tensor]) -> int:
    return sum(m.numel() for m in masks.values())


def global_topk_masks(scores: dict[str, torch.Tensor], keep: int,
                      masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep the ``keep`` highest scores over all layers together (only among positions ``masks`` still keeps;
    ties broken by position, first kept). Every other position is masked."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().double() for n in names])
    alive = (torch.cat([masks[n].flatten() for n in names]).to(flat.device) if masks is not None
             else torch.ones_like(flat, dtype=torch.bool))
    keep = max(0, min(int(keep), int(alive.sum())))
    flat = torch.where(alive, flat, torch.full_like(flat, -math.inf))
    order = torch.argsort(flat, descending=True, stable=True)
    kept = torch.zeros_like(alive)
    kept[order[:keep]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = kept[start:start + size].view_as(scores[n]).to(scores[n].device)
        start += size
    return out
