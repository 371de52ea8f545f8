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
from inferno.pruning.llm import surgery
from inferno.pruning.llm.methods import PruningMethod, SparseGPT, Wanda
from inferno.pruning.llm.runner import find_linears, get_blocks, get_weight, run_layers
from inferno.pruning.llm.scores import InputNorms, wanda
from inferno.pruning.llm.structured import StructuredMethod, lowest, unit_params, unit_scores

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



# ----------------------------------------------------------------------------------- composite projection pruning
def _nonzero(model: nn.Module) -> int:
    return sum(int((get_weight(m) != 0).sum()) for b in get_blocks(model) for m in find_linears(b).values())


def _numel(model: nn.Module) -> int:
    return sum(get_weight(m).numel() for b in get_blocks(model) for m in find_linears(b).values())


class MosaicStructured(StructuredMethod):
    """The composite's structured part (the project's design: the public code has no structured half). From one
    dense pass: per block, the POD ratio of its attention projections together and of its MLP projections together;
    these groups get structured fractions by the ``pod`` rule (parameter-weighted mean exactly ``sparsity``, fewer
    units from outlier-heavy groups); within a group the units with the lowest Wanda-sp scores go (KV group: sum over
    its o_proj columns of mean_i |W_o[i, j]| * ||X_j||; neuron: the same on down_proj). Every layer keeps a KV group."""

    name = "mosaic_composite"
    variant = "structured"

    def __init__(self, sparsity=0.1, mosaic_m=5.0, mosaic_lambda=0.05, apply="remove"):
        super().__init__(sparsity, apply)
        self.m, self.lam = float(mosaic_m), float(mosaic_lambda)
        self.group_ratios: dict[tuple[int, str], float] = {}
        self.group_fractions: dict[tuple[int, str], float] = {}

    def prepare(self, model, state, device="cpu", store_device="cpu", progress=True, **_):
        scores, sizes, units = {}, {}, {}

        def process(b):
            c, u = surgery.coupled(b.module, b.config), surgery.block_units(b.module, b.config)
            pg, pn = unit_params(b.module, b.config)
            for kind, slices, n, per in (("attn", c.heads, u["kv_heads"], pg), ("mlp", c.neurons, u["neurons"], pn)):
                mods = list(dict.fromkeys(s.module for s in slices))
                names = {m: next(k for k, v in b.linears.items() if v is m) for m in mods}
                every = torch.cat([wanda(get_weight(m), b.stats[names[m]]).flatten() for m in mods])
                self.group_ratios[(b.index, kind)] = outlier_ratio(every, self.m)
                sizes[(b.index, kind)] = n * per
                out = next(s for s in slices if s.dim == "in")
                w = get_weight(out.module).float().abs()
                sal = {out.module: w.mean(0, keepdim=True) * b.stats[names[out.module]].norms.to(w.device)}
                scores[(b.index, kind)] = unit_scores([out], sal, n)
                units[(b.index, kind)] = n
            return False

        run_layers(model, state, range(state.next_layer, len(get_blocks(model))), process,
                   lambda name, mod: InputNorms(get_weight(mod).shape[1], device), device, store_device,
                   "mosaic_composite[pod]", progress)
        self.group_sizes = sizes
        self.group_fractions = allocate_pod(self.group_ratios, sizes, self.sparsity, self.lam)
        drop: dict[int, dict[str, list[int]]] = {}
        for key, t in self.group_fractions.items():
            n = units[key]
            k = min(round(max(0.0, t) * n), n - 1 if key[1] == "attn" else n)
            drop.setdefault(key[0], {})[key[1]] = lowest(scores[key], k)
        for i, d in drop.items():
            if d.get("attn") or d.get("mlp"):
                self.decisions[i] = surgery.BlockDecision(heads=d.get("attn", []), neurons=d.get("mlp", []))


class MosaicComposite(Mosaic):
    """Composite projection pruning (``pruner=mosaic_composite``; the project's design, see
    :class:`MosaicStructured`): a structured part removes ``structured_fraction`` of the parameters to remove as
    whole KV groups / neurons (physically, or masked with ``apply="mask"``), then Mosaic's per-projection
    unstructured pruning of what remains reaches ``sparsity`` of the block linears' weights in total.
    ``stages(model)`` yields the two methods for the one runner, in order."""

    name = "mosaic_composite"

    def __init__(self, sparsity=0.5, pattern="unstructured", base="sparsegpt", mosaic_m=5.0, mosaic_lambda=0.08,
                 allocation="pod", group=None, blocksize=128, percdamp=0.01, structured_fraction=0.25, apply="remove"):
        if isinstance(structured_fraction, bool) or not isinstance(structured_fraction, (int, float)) \
                or not 0 <= structured_fraction <= 1:
            raise ConfigError(f"pruner.structured_fraction: {structured_fraction!r} must be a number in [0, 1] (the "
                              "share of the removed parameters taken by whole units)")
        s = float(sparsity)
        self.target, self.fraction = s, float(structured_fraction)
        self.structured_target = s * self.fraction
        # the unstructured part's sparsity on what the structured part leaves, if that part hits its target exactly
        rest = (s - self.structured_target) / (1 - self.structured_target) if self.structured_target < 1 else 0.0
        super().__init__(rest, pattern, base, mosaic_m, mosaic_lambda, allocation, group, blocksize, percdamp)
        # the structured groups' spread: at most lambda, and never below zero
        self.structured = MosaicStructured(self.structured_target, mosaic_m, min(float(mosaic_lambda),
                                           self.structured_target / 2), apply)
        self.apply = self.structured.apply

    @property
    def variant(self) -> str:
        return f"{self.base.name}_{self.allocation}_f{self.fraction:g}"

    def check(self, model: nn.Module) -> None:
        """A family without structured support is refused before any calibration (one line)."""
        self.structured.check(model)

    def stages(self, model: nn.Module):
        before = _numel(model)
        nonzero = _nonzero(model)
        if self.fraction > 0:
            yield self.structured
        removed = nonzero - _nonzero(model)
        rest = (self.target * before - removed) / max(1, before - removed)
        self.sparsity = self.base.sparsity = min(max(rest, 0.0), 0.99)
        if self.sparsity > 0:
            yield self

    def report(self) -> dict:
        return super().report() | {"structured_fraction": self.fraction, "structured_target": self.structured_target,
                                   "unstructured_sparsity": self.sparsity,
                                   "group_ratios": {f"{i}.{k}": v for (i, k), v in self.structured.group_ratios.items()},
                                   "group_fractions": {f"{i}.{k}": v for (i, k), v in self.structured.group_fractions.items()},
                                   "structured": self.structured.summary()}
