"""Pruning-at-initialization (PaI) scores on an untrained network: SNIP and SynFlow, and the global masks they give.

* **SNIP** (Lee et al. 2019, connection sensitivity): ``|w * dL/dw|`` of the cross-entropy on training examples,
  kept globally top-k in one shot. Here the gradient is that of the mean loss over ``inputs`` (summed batch by
  batch), taken on a copy in training mode (BatchNorm normalises with the batch's statistics, as in the first
  training step; the copy's running statistics are thrown away). SNIP normalises the scores by their sum, which
  does not change a top-k, so the raw ``|w * g|`` is returned.
* **SynFlow** (Tanaka et al. 2020, iterative synaptic flow): data-free. A copy of the network in double precision
  (the authors' recommendation), in eval mode, with every parameter and floating buffer replaced by its absolute
  value: BatchNorm then uses its running statistics (at initialisation mean 0, variance 1, so it is the positive
  per-channel map ``|gamma| x / sqrt(1 + eps) + |beta|``). The input is all ones of the data's shape (batch 1),
  ``R`` the sum of the output, the score ``|theta * dR/dtheta|``. Pruning is iterative: round ``k`` of ``n``
  keeps the top ``d**(k/n)`` of all scored weights (exponential schedule), scores recomputed every round with the
  weights pruned so far set to zero. Activations are left as they are: with ReLU (ResNet-20) the network on a
  positive input is linear in every layer, as SynFlow intends; MicroCNN's SiLU and SE sigmoid gates keep every
  activation positive but are not linear, so there SynFlow scores the network as it is (no activation is swapped).

Both score the convolutions and linears named in ``layers`` (``masks.prunable_layers``; the head is an option of
the caller). Scores are returned on the network's device in its dtype; masks are bool, True where a weight is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from inferno.pruning.cnn.masks import global_topk_masks, is_masked

PAI_SCORES = ("snip", "synflow")


def _weights(model: nn.Module, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        layer = modules[name]
        if is_masked(layer):
            raise ValueError(f"PaI scores take an unmasked network; layer {name} carries a mask")
        out[name] = layer.weight
    return out


def keep_count(density: float, total: int) -> int:
    """Weights a global mask at ``density`` keeps out of ``total`` (rounded, at least one)."""
    return max(1, min(total, round(float(density) * total)))


# ----------------------------------------------------------------------------------- SNIP
def snip_scores(net: nn.Module, layers: Iterable[str], inputs: torch.Tensor, labels: torch.Tensor,
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``|w * dL/dw|`` for every named layer, ``L`` the mean cross-entropy over ``inputs`` (see the module
    docstring). ``net`` is not changed."""
    model = copy.deepcopy(net).train()
    weights = _weights(model, layers)
    names, params = list(weights), list(weights.values())
    grads = [torch.zeros_like(p) for p in params]
    n = len(inputs)
    with torch.enable_grad():
        for i in range(0, n, batch_size):
            x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
            loss = F.cross_entropy(model(x), y, reduction="sum") / n
            for g, d in zip(grads, torch.autograd.grad(loss, params)):
                g += d
    return {name: (p.detach() * g).abs() for name, p, g in zip(names, params, grads)}


def snip_masks(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """SNIP's one-shot global top-k at ``density`` of the scored weights."""
    return global_topk_masks(scores, keep_count(density, sum(s.numel() for s in scores.values())))


# ----------------------------------------------------------------------------------- SynFlow
def synflow_schedule(density: float, rounds: int) -> list[float]:
    """The density kept after each of ``rounds`` rounds: ``density ** (k / rounds)``, k = 1..rounds."""
    return [float(density) ** (k / rounds) for k in range(1, rounds + 1)]


class SynFlow:
    """The linearised copy of ``net`` SynFlow scores (see the module docstring): built once, its weights reset to
    ``|theta| * mask`` before every round."""

    def __init__(self, net: nn.Module, layers: Iterable[str], input_shape: tuple[int, ...], double: bool = True):
        self.model = copy.deepcopy(net).eval()
        if double:
            self.model.double()
        with torch.no_grad():
            for t in (*self.model.parameters(), *self.model.buffers()):
                if t.is_floating_point():
                    t.abs_()
        self.weights = _weights(self.model, layers)
        self.absolute = {n: w.detach().clone() for n, w in self.weights.items()}
        p = next(self.model.parameters())
        self.input = torch.ones(1, *input_shape, dtype=p.dtype, device=p.device)

    def scores(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``|theta * dR/dtheta|`` of every named layer with the weights outside ``masks`` at zero."""
        with torch.no_grad():
            for n, w in self.weights.items():
                w.copy_(self.absolute[n] if masks is None else self.absolute[n] * masks[n].to(w.dtype))
        params = list(self.weights.values())
        with torch.enable_grad():
            r = self.model(self.input).sum()
            grads = torch.autograd.grad(r, params)
        return {n: (w.detach() * g).abs() for (n, w), g in zip(self.weights.items(), grads)}


def synflow_masks(net: nn.Module, layers: Iterable[str], input_shape: tuple[int, ...], density: float,
                  rounds: int = 100, double: bool = True, progress=None):
    """Iterative SynFlow to ``density``: returns ``(masks, scores)``, ``scores`` those of the last round (weights
    pruned in earlier rounds score 0). ``progress(iterable, desc)`` wraps the rounds (e.g. ``RunContext.progress``)."""
    flow = SynFlow(net, layers, input_shape, double)
    total = sum(w.numel() for w in flow.weights.values())
    masks = None
    scores = {}
    schedule = synflow_schedule(density, rounds)
    rounds_iter = progress(schedule, "synflow rounds") if progress else schedule
    for d in rounds_iter:
        scores = flow.scores(masks)
        masks = global_topk_masks(scores, keep_count(d, total), masks)
    dtype = next(net.parameters()).dtype
    return masks, {n: s.to(dtype) for n, s in scores.items()}
