"""Mosaic (Eccles, Wong, Varghese 2025): every projection of every block pruned at its own sparsity, set by the
projection outlier distribution (``pruner=mosaic``).

**POD.** For projection p (q, k, v, o, gate, up, down -- every linear of the block) of block i, the outlier ratio
r_{p,i} is the fraction of its Wanda scores |W_jk| * ||X_k||_2 above ``mosaic_m`` times their mean; the block ratio
r_i is the same over the scores of all the block's projections together (OWL's ratio). Both come from one pass over
the dense model (:meth:`Mosaic.prepare`).

**Allocation** (``allocation``):

* ``pod`` (default, the rule as the paper describes it): every r_{p,i} of the model min-max scaled together to
  d_{p,i} in [0, 2 lambda]; s_{p,i} = s - d_{p,i} + sum(n d) / sum(n) with n the projections' parameter counts, so
  more outliers prune less and the parameter-weighted mean sparsity is exactly s.
* ``reference`` (the public code, ``lib/prune_all.py`` ``prune_sparsegpt_mosaic``): c_i = the block ratios min-max
  scaled over the layers to [0, 2 lambda]; for each projection type, its ratios min-max scaled over the layers the
  same way, c_{p,i}; s_{p,i} = s - c_i + mean_i(c_{p,i}), and any s_{p,i} <= 0 becomes 0.01. A projection's own
  profile enters only through the layer mean of its scaled ratios; the model-wide sparsity can drift from s
  (:attr:`Mosaic.drift` reports it).

Each projection is then pruned by SparseGPT (``base``, default) or Wanda at its own sparsity through the one
sequential runner.
"""

from __future__ import annotations

import torch
from torch import nn

from inferno.errors import ConfigError, check_choice
from inferno.pruning.llm.methods import PruningMethod, SparseGPT, Wanda
from inferno.pruning.llm.runner import get_blocks, get_weight, run_layers
from inferno.pruning.llm.scores import InputNorms, wanda

ALLOCATIONS = ("pod", "reference")


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Fraction of ``scores`` above ``m`` times their mean (OWL's outlier ratio)."""
    scores = scores.float()
    return float((scores > m * scores.mean()).sum()) / scores.numel()


def scale(values: torch.Tensor, lam: float) -> torch.Tensor:
    """Min-max scaled to [0, 2 lambda] (all zeros when the values are all equal)."""
    values = values.double()
    span = values.max() - values.min()
    return (values - values.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(values)


def allocate_pod(ratios: dict, sizes: dict, sparsity: float, lam: float) -> dict:
    """``pod``: {key: s_p} with s_p = s - d_p + weighted mean of d (see module docstring)."""
    keys = list(ratios)
    d = scale(torch.tensor([ratios[k] for k in keys], dtype=torch.float64), lam)
    n = torch.tensor([sizes[k] for k in keys], dtype=torch.float64)
    shift = float((n * d).sum() / n.sum())
    return {k: sparsity - float(dk) + shift for k, dk in zip(keys, d)}


def allocate_reference(ratios: dict, block_ratios: dict, sparsity: float, lam: float) -> dict:
    """``reference``: {(layer, projection): s} as the public code computes it (see module docstring)."""
    layers = sorted(block_ratios)
    c = dict(zip(layers, scale(torch.tensor([block_ratios[i] for i in layers], dtype=torch.float64), lam).tolist()))
    out = {}
    for p in sorted({p for _, p in ratios}):
        idx = [i for i in layers if (i, p) in ratios]
        cp = scale(torch.tensor([ratios[(i, p)] for i in idx], dtype=torch.float64), lam)
        mean = float(cp.mean())
        for i in idx:
            s = sparsity - c[i] + mean
            out[(i, p)] = s if s > 0 else 0.01
    return out


class Mosaic(PruningMethod):
    """Mosaic per-projection pruning (see module docstring)."""

    name = "mosaic"

    def __init__(self, sparsity=0.5, pattern="unstructured", base="sparsegpt", mosaic_m=5.0, mosaic_lambda=0.08,
                 allocation="pod", group=None, blocksize=128, percdamp=0.01):
        super().__init__(sparsity, pattern, group or ("layer" if base == "sparsegpt" else "row"))
        if self.pattern != "unstructured":
            raise ConfigError("pruner=mosaic sets a sparsity per projection and needs pruner.pattern='unstructured'")
        check_choice("pruner.base", base, ("sparsegpt", "wanda"))
        self.base = (SparseGPT(self.sparsity, self.pattern, self.group, blocksize, percdamp) if base == "sparsegpt"
                     else Wanda(self.sparsity, self.pattern, self.group))
        if isinstance(mosaic_m, bool) or not isinstance(mosaic_m, (int, float)) or not mosaic_m > 0:
            raise ConfigError(f"pruner.mosaic_m: {mosaic_m!r} must be a number > 0 (outlier: score > M x mean)")
        if isinstance(mosaic_lambda, bool) or not isinstance(mosaic_lambda, (int, float)) or not mosaic_lambda >= 0:
            raise ConfigError(f"pruner.mosaic_lambda: {mosaic_lambda!r} must be a number >= 0")
        lo, hi = self.sparsity - 2 * mosaic_lambda, self.sparsity + 2 * mosaic_lambda
        if lo < 0 or hi >= 1:
            raise ConfigError(f"pruner.mosaic_lambda: {mosaic_lambda} lets a projection's sparsity reach "
                              f"[{lo:.3f}, {hi:.3f}] around pruner.sparsity={self.sparsity}, outside [0, 1); "
                              f"use lambda <= {min(self.sparsity, 1 - self.sparsity - 1e-9) / 2:.4f}")
        self.m, self.lam = float(mosaic_m), float(mosaic_lambda)
        self.allocation = check_choice("pruner.allocation", allocation, ALLOCATIONS)
        self.ratios: dict[tuple[int, str], float] = {}  # (layer, projection) -> r_{p,i}
        self.block_ratios: dict[int, float] = {}
        self.sizes: dict[tuple[int, str], int] = {}
        self.per_projection: dict[tuple[int, str], float] = {}

    @property
    def variant(self) -> str:
        return f"{self.base.name}_{self.allocation}"

    def make_stats(self, in_features, device="cpu"):
        return self.base.make_stats(in_features, device)

    def measure(self, model: nn.Module, state, device="cpu", store_device="cpu", progress=True) -> None:
        """The POD of the dense model: r_{p,i} per projection, r_i per block, and the projections' sizes."""

        def process(b):
            all_scores = []
            for name, mod in b.linears.items():
                scores = wanda(get_weight(mod), b.stats[name])
                self.ratios[(b.index, name)] = outlier_ratio(scores, self.m)
                self.sizes[(b.index, name)] = scores.numel()
                all_scores.append(scores.flatten())
            self.block_ratios[b.index] = outlier_ratio(torch.cat(all_scores), self.m)
            return False  # nothing changed: the dense outputs feed the next block

        run_layers(model, state, range(state.next_layer, len(get_blocks(model))), process,
                   lambda name, mod: InputNorms(get_weight(mod).shape[1], device), device, store_device,
                   "mosaic[pod]", progress)

    def prepare(self, model, state, device="cpu", store_device="cpu", progress=True, **_):
        self.measure(model, state, device, store_device, progress)
        if self.allocation == "pod":
            self.per_projection = allocate_pod(self.ratios, self.sizes, self.sparsity, self.lam)
        else:
            self.per_projection = allocate_reference(self.ratios, self.block_ratios, self.sparsity, self.lam)

    @property
    def drift(self) -> float:
        """Parameter-weighted mean of the allocated sparsities minus the target (0 for ``pod``)."""
        n = sum(self.sizes[k] for k in self.per_projection)
        return sum(self.sizes[k] * s for k, s in self.per_projection.items()) / n - self.sparsity

    def prune_weight(self, weight, stats, layer_index=0, name=None):
        short = name.split(f".{layer_index}.", 1)[1] if name and f".{layer_index}." in name else name
        self.base.per_layer = {layer_index: self.per_projection[(layer_index, short)]}
        return self.base.prune_weight(weight, stats, layer_index, name)

    def report(self) -> dict:
        """What ``sparsity.json`` records: the POD and the allocation."""
        key = lambda k: f"{k[0]}.{k[1]}"
        return {"mosaic_allocation": self.allocation, "mosaic_m": self.m, "mosaic_lambda": self.lam,
                "mosaic_block_ratios": self.block_ratios, "mosaic_drift": self.drift,
                "mosaic_ratios": {key(k): v for k, v in self.ratios.items()},
                "mosaic_sparsity": {key(k): v for k, v in self.per_projection.items()}}

