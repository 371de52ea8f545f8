"""``pruner=reconvene``: structured pruning at initialisation (Reconvene; Eccles, Wong, Varghese 2024).

The paper's pipeline, as it describes it (the public code is not available): an unstructured PaI method prunes the
*untrained* network; a sensitivity evaluator finds the convolution layers least sensitive to structured pruning; those
are pruned structurally, the layers this affects are re-initialised, and the model is trained once. Per the paper's
summary, its sensitivity test compares each layer's sparsity after unstructured PaI with the global sparsity. What
follows is **the project's design from that description** (labelled so in the README):

1. **Scores and the unstructured mask** (``inferno.pruning.cnn.pai``): SNIP or SynFlow on the untrained network
   (``ctx.net``, seeded), a global mask keeping ``density`` of the scored weights (convolutions and linears; the head
   with ``include_head``). This mask, trained as it is, is the **unstructured PaI counterpart** (``*_unstructured``).
2. **Units.** Torch-Pruning's dependency graph (``surgery.channel_groups``) groups every layer that must lose a channel
   together. A unit is a group whose producers are convolutions and which has more than ``min_channels`` channels.
   A group with several producers (a residual stream: the stem or a projection shortcut and every block's last conv
   added to it; MicroCNN's SE gate multiplied into it) is one unit whose statistics pool its producers'
   (``multi_producer=pool``), or is never made structured (``multi_producer=skip``, the default: cutting a
   residual stream to its density wrecked training in results/reconvene, keeping it whole did not).
3. **Sensitivity** (lower = less sensitive), every kind relative to the network's average so that ``threshold=1``
   means "less sensitive than average":
   ``sparsity`` (default; the paper's test as summarised): the unit's density under the unstructured mask over the
   global density (a unit PaI thinned more than the network is deemed redundant);
   ``mass``: the fraction of the unit's surviving score mass (scores of the weights the mask keeps) that lies outside
   the filters a filter-wise mask at the unit's density keeps, over the mean of that fraction;
   ``loss``: the increase of the cross-entropy on ``calib_samples`` training examples when that unit's mask alone is
   made filter-wise (the rest unstructured), over the mean absolute increase.
4. **Selection.** Units with sensitivity below ``threshold`` are pruned structurally, or, with
   ``structured_fraction``, that fraction of the units (rounded up), least sensitive first.
5. **Structured pruning.** A selected unit keeps ``round(d_u * n)`` (at least ``min_channels``) of its ``n`` channels,
   those with the most surviving score mass (pooled over the producers); the others are removed with
   ``surgery.remove_channels``, so consumers, BatchNorms, residual partners and SE gates shrink with them. A selected
   unit's producers become dense (their kept filters whole); every other layer keeps its unstructured mask, sliced to
   the new shapes (``keep_masks``; false: they train dense). The model is a smaller network, sparse where it was not
   made structured (the paper: "a smaller model"; that the rest stays sparse is this project's assumption).
6. **Re-initialisation** (the paper's "resilient layer rectifier", as its summary describes it): every module whose
   parameter shapes changed gets ``reset_parameters()`` (their fan-in changed; ``reinit=affected``), or every module
   (``all``), or none (``none``: the original initial values, sliced). Seeded by the run's seed.
7. **Training once**: every model (structured, its unstructured counterpart, and the dense reference ``ctx.dense()``)
   with the run's recipe for ``train_epochs`` (default ``train.dense_epochs``).

Points: method ``reconvene``, ``variant`` ``<score>_structured`` / ``<score>_unstructured`` (one curve each), columns
``score``, ``structure``, ``target_density``, ``achieved_density`` (non-zero weights of the scored layers over the dense
model's), ``structured_layers`` (producer convolutions made structured), ``structured_units`` (their group roots),
``prune_s`` (seconds from the untrained network to the pruned model: scores, masks, and for the structured model the
sensitivity test, surgery and re-initialisation), ``compression`` (dense params / params), ``nonzero_params``,
``nonzero_compression``, ``planned_params`` (the structured model's parameter count computed from its plan and the
dense layer shapes; equal to ``params``), ``pai_samples`` (training examples the scores and sensitivity read, counted
in ``train_samples`` too). ``sparsity`` is 1 - non-zero params / dense params for both variants.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError, check_bool, check_choice, check_int
from inferno.pruning.cnn.masks import apply_masks, make_permanent, prunable_layers
from inferno.pruning.cnn.pai import PAI_SCORES, snip_masks, snip_scores, synflow_masks
from inferno.pruning.cnn.surgery import ChannelGroup, channel_groups, conv_bn_pairs, remove_channels
from inferno.training import check_epochs

SENSITIVITIES = ("sparsity", "mass", "loss")
MULTI_PRODUCER = ("pool", "skip")
REINIT = ("affected", "all", "none")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_densities(densities, key: str = "pruner.densities") -> list[float]:
    if isinstance(densities, (int, float)) and not isinstance(densities, bool):
        densities = [densities]
    if isinstance(densities, (str, bytes)) or not isinstance(densities, Sequence) or not densities:
        raise ConfigError(f"{key}: {densities!r} must be a non-empty list of densities in (0, 1]")
    for d in densities:
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise ConfigError(f"{key}: density {d!r} is not a number; densities are in (0, 1]")
        if not 0.0 < float(d) <= 1.0:
            raise ConfigError(f"{key}: density {d} is outside (0, 1]")
    return [float(d) for d in densities]


def check_scores(scores, key: str = "pruner.scores") -> list[str]:
    if isinstance(scores, str):
        scores = [scores]
    if not isinstance(scores, Sequence) or not scores:
        raise ConfigError(f"{key}: {scores!r} must be a non-empty list of PaI scores ({', '.join(PAI_SCORES)})")
    for s in scores:
        check_choice(key, s, PAI_SCORES, "PaI score")
    if len(set(scores)) != len(scores):
        raise ConfigError(f"{key}: {list(scores)!r} names a score twice")
    return list(scores)


# ----------------------------------------------------------------------------------- units and plans
@dataclass
class Unit:
    """A channel group that may be made structured, with its statistics under one unstructured mask."""

    group: ChannelGroup
    density: float  # surviving fraction of the producers' weights
    channel_mass: torch.Tensor  # surviving score mass per root channel, pooled over the producers
    keep: list[int]  # root channels a filter-wise mask at ``density`` keeps (most surviving mass first, sorted)
    sensitivity: float = math.nan

    @property
    def root(self) -> str:
        return self.group.root

    @property
    def drop(self) -> list[int]:
        kept = set(self.keep)
        return [j for j in range(self.group.size) if j not in kept]


def kept_channels(channel_mass: torch.Tensor, density: float, min_channels: int = 1) -> list[int]:
    """The ``round(density * n)`` channels (at least ``min_channels``) with the most mass, ties to the lower index."""
    n = len(channel_mass)
    k = min(n, max(min_channels, round(density * n)))
    order = torch.argsort(channel_mass.double(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def build_units(groups: list[ChannelGroup], masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                min_channels: int = 1, multi_producer: str = "pool") -> list[Unit]:
    """The candidate units of ``groups`` (see the module docstring) with their density and kept channels."""
    units = []
    for g in groups:
        if g.size <= min_channels or not all(isinstance(m, CONVS) for _, m, _ in g.producers):
            continue
        if multi_producer == "skip" and len(g.producers) > 1:
            continue
        if any(name not in masks for name, _, _ in g.producers):
            continue
        kept = total = 0
        mass = torch.zeros(g.size, dtype=torch.float64)
        for name, layer, idxs in g.producers:
            m = masks[name]
            kept += int(m.sum())
            total += m.numel()
            per_filter = (scores[name].double() * m).flatten(1).sum(1).cpu()
            mass += per_filter[idxs]
        d = kept / total
        units.append(Unit(g, d, mass, kept_channels(mass, d, min_channels)))
    return units


def filterwise_masks(unit: Unit, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with the unit's producers made filter-wise: its kept channels' filters whole, the others off."""
    out = dict(masks)
    for name, layer, idxs in unit.group.producers:
        rows = torch.zeros(layer.weight.shape[0], dtype=torch.bool)
        rows[[idxs[j] for j in unit.keep]] = True
        out[name] = rows.view(-1, *[1] * (layer.weight.dim() - 1)).expand_as(layer.weight).to(masks[name].device).clone()
    return out


def masked_loss(net: nn.Module, masks: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor,
                batch_size: int = 64) -> float:
    """Mean cross-entropy of ``net`` with ``masks`` applied to its weights (a copy in training mode, as SNIP's)."""
    model = copy.deepcopy(net).train()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            modules[name].weight.mul_(m.to(modules[name].weight.dtype))
        total = 0.0
        for i in range(0, len(inputs), batch_size):
            total += float(F.cross_entropy(model(inputs[i:i + batch_size]), labels[i:i + batch_size], reduction="sum"))
    return total / len(inputs)


def set_sensitivities(units: list[Unit], kind: str, global_density: float, masks: dict[str, torch.Tensor],
                      net: nn.Module | None = None, calib: tuple | None = None, batch_size: int = 64) -> None:
    """Each unit's sensitivity of ``kind``, relative to the network's average (see the module docstring)."""
    if not units:
        return
    if kind == "sparsity":
        raw = [u.density / global_density for u in units]
    elif kind == "mass":
        lost = []
        for u in units:
            total = float(u.channel_mass.sum())
            lost.append(1.0 - float(u.channel_mass[u.keep].sum()) / total if total > 0 else 0.0)
        mean = sum(lost) / len(lost)
        raw = [x / mean if mean > 0 else 0.0 for x in lost]
    else:  # loss
        base = masked_loss(net, masks, *calib, batch_size)
        rises = [masked_loss(net, filterwise_masks(u, masks), *calib, batch_size) - base for u in units]
        mean = sum(abs(r) for r in rises) / len(rises)
        raw = [r / mean if mean > 0 else 0.0 for r in rises]
    for u, s in zip(units, raw):
        u.sensitivity = float(s)


def select_units(units: list[Unit], threshold: float = 1.0, fraction: float | None = None) -> list[Unit]:
    """Units to make structured: sensitivity below ``threshold``, or the least sensitive ``fraction`` (rounded up);
    a unit that would keep every channel is never selected."""
    candidates = [u for u in units if u.drop]
    if fraction is not None:
        ranked = sorted(candidates, key=lambda u: u.sensitivity)
        return ranked[:math.ceil(fraction * len(units))]
    return [u for u in candidates if u.sensitivity < threshold]


def planned_params(net: nn.Module, groups: list[ChannelGroup], removed: dict[str, int]) -> int:
    """Parameters ``net`` will have once every group root in ``removed`` loses that many channels, from the layer
    shapes alone: a producer loses output channels, a consumer input channels, a BatchNorm right after a
    convolution (``surgery.conv_bn_pairs``) follows its convolution; every other parameter stays."""
    out_drop: dict[str, int] = {}
    in_drop: dict[str, int] = {}
    for g in groups:
        r = removed.get(g.root, 0)
        if r:
            for name, _, _ in g.producers:
                out_drop[name] = out_drop.get(name, 0) + r
            for name, _, _ in g.consumers:
                in_drop[name] = in_drop.get(name, 0) + r
    bn_of = {bn: conv for conv, bn in conv_bn_pairs(net)}
    total = 0
    for name, m in net.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, CONVS):
            o, i = m.out_channels - out_drop.get(name, 0), m.in_channels - in_drop.get(name, 0)
            total += o * (i // m.groups) * math.prod(m.kernel_size) + (o if m.bias is not None else 0)
        elif isinstance(m, nn.Linear):
            o, i = m.out_features - out_drop.get(name, 0), m.in_features - in_drop.get(name, 0)
            total += o * i + (o if m.bias is not None else 0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and name in bn_of:
            c = m.num_features - out_drop.get(bn_of[name], 0)
            total += c * len(own)
        else:
            total += sum(p.numel() for p in own)
    return total


def structured_model(init: nn.Module, example: torch.Tensor, masks: dict[str, torch.Tensor], selected: list[Unit],
                     keep_masks: bool = True, reinit: str = "affected", seed: int = 0) -> nn.Module:
    """A copy of the untrained ``init`` with every selected unit's dropped channels removed (Torch-Pruning), the masks
    of the other layers sliced the same way and applied (``keep_masks``), the affected modules re-initialised."""
    net = copy.deepcopy(init)
    plan = {u.root: u.drop for u in selected}
    dense_layers = {name for u in selected for name, _, _ in u.group.producers}
    # the same surgery on a twin whose weights are the masks slices the masks exactly as the weights are sliced
    twin = copy.deepcopy(init)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            modules[name].weight.copy_(m.to(modules[name].weight.dtype))
    before = {n: [tuple(p.shape) for p in m.parameters(recurse=False)] for n, m in net.named_modules()}
    remove_channels(net, example, plan)
    remove_channels(twin, example, plan)
    twin_modules = dict(twin.named_modules())
    sliced = {name: twin_modules[name].weight.detach() != 0 for name in masks if name not in dense_layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, m in net.named_modules():
            shapes = [tuple(p.shape) for p in m.parameters(recurse=False)]
            changed = shapes != before.get(name)
            if hasattr(m, "reset_parameters") and (reinit == "all" or (reinit == "affected" and changed)):
                m.reset_parameters()
    if keep_masks:
        apply_masks(net, {n: m for n, m in sliced.items() if not bool(m.all())})
    return net


# ----------------------------------------------------------------------------------- the pruner
def nonzero_params(net: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in net.parameters())


class ReconvenePruner:
    """See the module docstring. Every option is checked here, before anything trains."""

    method = "reconvene"

    def __init__(self, densities: Sequence[float] = (0.1, 0.03), scores: Sequence[str] = ("snip", "synflow"),
                 include_head: bool = True, snip_samples: int = 256, synflow_rounds: int = 100,
                 synflow_double: bool = True, sensitivity: str = "sparsity", threshold: float = 1.0,
                 structured_fraction: float | None = None, multi_producer: str = "skip", min_channels: int = 1,
                 keep_masks: bool = True, reinit: str = "affected", calib_samples: int = 256,
                 train_epochs: float | None = None, unstructured: bool = True, record_dense: bool = True):
        self.densities = check_densities(densities)
        self.scores = check_scores(scores)
        self.include_head = check_bool("pruner.include_head", include_head)
        self.snip_samples = check_int("pruner.snip_samples", snip_samples, 1)
        self.synflow_rounds = check_int("pruner.synflow_rounds", synflow_rounds, 1)
        self.synflow_double = check_bool("pruner.synflow_double", synflow_double)
        self.sensitivity = check_choice("pruner.sensitivity", sensitivity, SENSITIVITIES, "sensitivity")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ConfigError(f"pruner.threshold: {threshold!r} must be a number > 0 (1: less sensitive than average)")
        self.threshold = float(threshold)
        if structured_fraction is not None and (
                isinstance(structured_fraction, bool) or not isinstance(structured_fraction, (int, float))
                or not 0.0 < float(structured_fraction) <= 1.0):
            raise ConfigError(f"pruner.structured_fraction: {structured_fraction!r} must be in (0, 1] or null")
        self.structured_fraction = None if structured_fraction is None else float(structured_fraction)
        self.multi_producer = check_choice("pruner.multi_producer", multi_producer, MULTI_PRODUCER, "value")
        self.min_channels = check_int("pruner.min_channels", min_channels, 1)
        self.keep_masks = check_bool("pruner.keep_masks", keep_masks)
        self.reinit = check_choice("pruner.reinit", reinit, REINIT, "value")
        self.calib_samples = check_int("pruner.calib_samples", calib_samples, 1)
        self.train_epochs = check_epochs("pruner.train_epochs", train_epochs, allow_none=True)
        self.unstructured = check_bool("pruner.unstructured", unstructured)
        self.record_dense = check_bool("pruner.record_dense", record_dense)

    # one density: the unstructured mask, and the structured model built from it
    def prune(self, init: nn.Module, example: torch.Tensor, score: str, density: float, snip: dict | None = None,
              calib: tuple | None = None, batch_size: int = 64, progress=None, seed: int = 0) -> dict:
        """Everything one (score, density) gives: ``masks``, ``scores``, ``units``, ``selected``, ``net`` (the
        structured model, untrained), ``plan_params``, ``unstructured_s`` and ``structured_s`` (seconds)."""
        layers = list(prunable_layers(init, self.include_head))
        t0 = time.perf_counter()
        if score == "snip":
            scores = snip if snip is not None else snip_scores(init, layers, *calib, batch_size)
            masks = snip_masks(scores, density)
        else:
            masks, scores = synflow_masks(init, layers, tuple(example.shape[1:]), density, self.synflow_rounds,
                                          self.synflow_double, progress)
        unstructured_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        _, groups = channel_groups(init, example)
        kept = sum(int(m.sum()) for m in masks.values())
        global_density = kept / sum(m.numel() for m in masks.values())
        units = build_units(groups, masks, scores, self.min_channels, self.multi_producer)
        set_sensitivities(units, self.sensitivity, global_density, masks, init, calib, batch_size)
        selected = select_units(units, self.threshold, self.structured_fraction)
        net = structured_model(init, example, masks, selected, self.keep_masks, self.reinit, seed)
        structured_s = time.perf_counter() - t1
        plan = planned_params(init, groups, {u.root: len(u.drop) for u in selected})
        return {"masks": masks, "scores": scores, "units": units, "selected": selected, "net": net,
                "plan_params": plan, "global_density": global_density, "unstructured_s": unstructured_s,
                "structured_s": structured_s}

    def run(self, ctx) -> None:
        init = copy.deepcopy(ctx.net).to(ctx.device)  # the untrained network (ctx.dense() trains ctx.net in place)
        init.eval()
        example = ctx.example()
        epochs = self.train_epochs if self.train_epochs is not None else ctx.cfg.train.dense_epochs
        batch_size = int(getattr(ctx.task, "batch_size", 64))
        dense_params = sum(p.numel() for p in init.parameters())
        layers = prunable_layers(init, self.include_head)
        dense_weights = sum(m.weight.numel() for m in layers.values())
        dense_macs = ctx.macs(init)
        if self.record_dense:
            ctx.dense()
        needs_data = "snip" in self.scores or self.sensitivity == "loss"
        n_calib = max(self.snip_samples if "snip" in self.scores else 0,
                      self.calib_samples if self.sensitivity == "loss" else 0)
        calib_all = ctx.calib_batch(n_calib) if needs_data else None
        snip_calib = (calib_all[0][:self.snip_samples], calib_all[1][:self.snip_samples]) if "snip" in self.scores else None
        loss_calib = (calib_all[0][:self.calib_samples], calib_all[1][:self.calib_samples]) \
            if self.sensitivity == "loss" else None
        self.best = None
        for score in self.scores:
            snip, snip_s = None, 0.0
            if score == "snip":  # one-shot scores do not depend on the density: computed once, timed into every point
                t = time.perf_counter()
                snip = snip_scores(init, list(layers), *snip_calib, batch_size)
                snip_s = time.perf_counter() - t
            pai_samples = len(snip_calib[0]) if score == "snip" else 0
            for step, density in enumerate(ctx.progress(self.densities, f"reconvene {score} densities"), start=1):
                out = self.prune(init, example, score, density, snip, loss_calib, batch_size, ctx.progress,
                                 int(ctx.cfg.seed))
                common = {"score": score, "target_density": density, "sensitivity": self.sensitivity,
                          "reinit": self.reinit, "include_head": self.include_head}
                selected = out["selected"]
                struct_samples = pai_samples + (len(loss_calib[0]) if loss_calib is not None else 0)
                extra = dict(common, structure="structured",
                             structured_layers=sum(len(u.group.producers) for u in selected),
                             structured_units=json.dumps([u.root for u in selected]),
                             unit_sensitivity=json.dumps({u.root: round(u.sensitivity, 4) for u in out["units"]}),
                             planned_params=out["plan_params"], pai_samples=struct_samples,
                             prune_s=round(snip_s + out["unstructured_s"] + out["structured_s"], 4))
                self._train_and_record(ctx, out["net"], struct_samples, dense_macs, epochs, step, extra, dense_params,
                                       dense_weights, list(layers), f"{score}_structured")
                if self.unstructured:
                    net = copy.deepcopy(init)
                    apply_masks(net, out["masks"])
                    extra = dict(common, structure="unstructured", structured_layers=0, pai_samples=pai_samples,
                                 prune_s=round(snip_s + out["unstructured_s"], 4))
                    self._train_and_record(ctx, net, pai_samples, dense_macs, epochs, step, extra, dense_params,
                                           dense_weights, list(layers), f"{score}_unstructured")
        ctx.results[self.method] = {"value": self.best.value if self.best else None,
                                    "variant": self.best.extra["variant"] if self.best else None,
                                    "target_density": self.best.extra["target_density"] if self.best else None}

    def _train_and_record(self, ctx, net, pai_samples, dense_macs, epochs, step, extra, dense_params, dense_weights,
                          layer_names, variant):
        cost = TrainingCost()
        if pai_samples:
            cost.add(pai_samples, dense_macs)  # the scores' (and loss test's) examples, read by the dense network
        net.to(ctx.device)
        ctx.finetune(net, epochs, cost)
        make_permanent(net)
        modules = dict(net.named_modules())
        kept = sum(int(torch.count_nonzero(modules[n].weight.detach())) for n in layer_names)
        params, nonzero = sum(p.numel() for p in net.parameters()), nonzero_params(net)
        extra = dict(extra, variant=variant, achieved_density=round(kept / dense_weights, 6),
                     compression=round(dense_params / params, 4), nonzero_params=nonzero,
                     nonzero_compression=round(dense_params / nonzero, 4))
        point = ctx.record(self.method, step, net, cost, extra=extra, sparsity=1.0 - nonzero / dense_params)
        if extra["structure"] == "structured" and (self.best is None or point.value > self.best.value):
            self.best = point
        return point

    def objective(self, ctx) -> float | None:
        """The best structured model's test accuracy over scores and densities."""
        return (ctx.results.get(self.method) or {}).get("value")
