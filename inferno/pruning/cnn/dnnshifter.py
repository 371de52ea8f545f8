"""``pruner=dnnshifter``: DNNShifter (Eccles et al. 2024) -- sparse models from iterative magnitude pruning with
rewinding, turned into physically smaller dense models by removing their all-zero filters, kept as a portfolio
that an edge device switches between.

1. **IMP with rewinding** (the reference trains with OpenLTH: ``lottery --levels=25 --rewinding_steps=2000it``,
   ``sparse_global`` pruning of 20 % per level with the head's weight ignored). The dense model is trained once
   (the run's ``dense`` point) and its weights after ``rewind_iter`` optimizer steps are kept. Level ``k`` prunes
   the trained level ``k-1`` globally by magnitude (every convolution and linear; the head only with
   ``prune_head``), rewinds the surviving weights (and BatchNorm statistics) to the kept early weights and trains
   again (``level_epochs``, the run's recipe). How many weights level ``k`` keeps (``count_rule``):
   ``reference`` -- the public code's rule, ``ceil(rate * remaining)`` pruned per level; ``geometric`` --
   ``round(N * (1 - rate)^k)`` kept (the project's option: density ``0.8^k`` within one weight at every level).
2. **Sparse -> smaller** (``shrink``): BatchNorm folded into the convolutions, then every channel whose filters
   are all zero -- in every layer that produces it (Torch-Pruning's dependency graph: the conv, its residual
   partners, the SE gate) -- is removed with the consumers' input channels. A zero filter still emits a constant
   (its folded bias, through the activation and whatever follows). ``constants=fold`` (default, exact): the
   constant every consumer sees is read off a probe batch (structurally constant: the zero filters emit their
   bias; the probe only tells its value and confirms nothing input-dependent touched it) and folded into the
   consumer's bias where that is exact -- a linear, or a convolution without padding (a padded k x k conv sees
   the constant only partly at the borders, so such a channel stays unless its constant is 0); a channel that
   is not constant at some consumer (e.g. gated by SE) stays too (``dead_kept``). ``constants=drop`` is the
   public code's rule (its VGG surgery deletes the zero filter with its bias and the next layer's input
   columns): every zero-filter channel goes and its constant is lost -- recorded as ``variant=naive`` beside
   the exact one when ``naive=true``, with its accuracy change.
3. **Portfolio**: every level's smaller model held in memory (``Portfolio.switch(level)``); points carry the
   in-memory switch time against loading the variant from disk (safetensors + rebuild) and against re-pruning
   it from the sparse model; ``ctx.results`` has the portfolio's weight memory against a portfolio of the sparse
   (dense-shaped) models. ``scripts/bench_dnnshifter.py`` times the three side by side.

Points (``method=dnnshifter``, ``step`` = level): ``variant`` ``sparse`` (the masked model), ``smaller`` (exact)
and ``naive``; columns ``level``, ``target_density``, ``filters_removed``, ``dead_filters``, ``dead_kept``,
``folded_constants``, ``max_abs_diff`` (smaller vs sparse logits on the probe batch), ``compression`` (sparse
params / smaller params), ``speedup`` (sparse latency / smaller latency), ``shrink_ms``, ``switch_ms``,
``reload_ms``, ``reprune_ms``; naive points ``value_change`` (naive - sparse accuracy).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import nn

from inferno.cost import model_device, weight_memory_mb
from inferno.errors import ConfigError, check_bool, check_choice, check_int
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.masks import (
    apply_masks,
    copy_net,
    current_masks,
    global_topk_masks,
    kept_count,
    make_permanent,
    prunable_layers,
    weight_of,
)
from inferno.pruning.cnn.surgery import channel_groups, fold_batchnorm, remove_channels
from inferno.tracking import HIGHER_IS_BETTER
from inferno.training import check_epochs

# The reference rewinds VGG-16 to iteration 2,000 of its 160 epochs x 391 iterations (OpenLTH, batch 128).
REWIND_FRACTION = 2000 / (160 * 391)
COUNT_RULES = ("reference", "geometric")
CONSTANTS = ("fold", "drop")
# Families a saved variant may name (a file never names code to import).
FAMILIES = {"MicroCNN": MicroCNN, "ResNet20": ResNet20}


# ----------------------------------------------------------------------------------- IMP
def level_keep(total: int, rate: float, level: int, rule: str = "reference", kept_before: int | None = None) -> int:
    """Weights level ``level`` keeps of ``total`` prunable ones: ``reference`` prunes ``ceil(rate * remaining)``
    of the ``kept_before`` weights of the previous level; ``geometric`` keeps ``round(total * (1 - rate)^level)``."""
    if rule == "geometric":
        return round(total * (1.0 - rate) ** level)
    remaining = total if kept_before is None else kept_before
    return remaining - math.ceil(rate * remaining)


def magnitude_masks(net: nn.Module, names: list[str], keep: int, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: of the weights ``masks`` still keeps in the layers ``names``, the ``keep``
    largest |w| (``net``'s current, trained weights) stay."""
    modules = dict(net.named_modules())
    scores = {n: weight_of(modules[n]).detach().abs() for n in names}
    return global_topk_masks(scores, keep, masks)


class RewindCapture(L.Callback):
    """Keeps a copy of the trained network's state (parameters and buffers) after ``step`` optimizer steps
    (``0``: before the first step, i.e. the initialisation)."""

    def __init__(self, step: int):
        self.step, self.state = int(step), None

    def _take(self, module) -> None:
        self.state = {k: v.detach().clone().cpu() for k, v in module.net.state_dict().items()}

    def on_train_start(self, trainer, module):
        if self.step == 0 and self.state is None:
            self._take(module)

    def on_train_batch_end(self, trainer, module, *args):
        if self.state is None and trainer.global_step == self.step:
            self._take(module)


# ----------------------------------------------------------------------------------- sparse -> smaller
@dataclass
class ShrinkPlan:
    """What ``shrink`` removes: ``remove`` (root layer -> its channels), ``folds`` ((consumer, input channel,
    constant) added to the consumer's bias), and how many zero-filter channels were found / kept."""

    remove: dict[str, list[int]] = field(default_factory=dict)
    folds: list[tuple[str, int, float]] = field(default_factory=list)
    dead: int = 0
    kept: int = 0

    @property
    def removed(self) -> int:
        return sum(len(v) for v in self.remove.values())


def _foldable(layer: nn.Module) -> bool:
    """A constant input channel adds the same amount to every output position: linears, unpadded convolutions."""
    if isinstance(layer, nn.Linear):
        return True
    pad = layer.padding
    return layer.groups == 1 and (pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad)))


def _consumer_inputs(net: nn.Module, probe: torch.Tensor, names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per consumer layer: (is-constant, value) of each input channel over the probe batch and every position."""
    stats, handles = {}, []
    modules = dict(net.named_modules())

    def hook(name):
        def f(_mod, inp):
            x = inp[0].detach()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
            stats[name] = (lo == hi, lo)
        return f

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            net(probe)
    finally:
        for h in handles:
            h.remove()
    return stats


def shrink_plan(net: nn.Module, example: torch.Tensor, probe: torch.Tensor, constants: str = "fold") -> ShrinkPlan:
    """The zero-filter channels of a BatchNorm-folded ``net`` that can go (see the module docstring)."""
    _, groups = channel_groups(net, example)
    inputs = _consumer_inputs(net, probe, {c[0] for g in groups for c in g.consumers}) if constants == "fold" else {}
    plan = ShrinkPlan()
    for g in groups:
        drop = []
        for j in range(g.size):
            if any(int(torch.count_nonzero(layer.weight[idxs[j]])) for _, layer, idxs in g.producers):
                continue
            plan.dead += 1
            folds, ok = [], True
            if constants == "fold":
                for name, layer, idxs in g.consumers:
                    constant, value = inputs[name]
                    c = idxs[j]
                    if not bool(constant[c]):
                        ok = False
                        break
                    v = float(value[c])
                    if v != 0.0:
                        if not _foldable(layer):
                            ok = False
                            break
                        folds.append((name, c, v))
            if ok:
                drop.append(j)
                plan.folds.extend(folds)
            else:
                plan.kept += 1
        if len(drop) == g.size:  # a layer keeps at least one channel (its constant stays exact in place)
            drop.pop()
            plan.folds = [f for f in plan.folds if not _is_channel(f, g, g.size - 1)]
            plan.kept += 1
        if drop:
            plan.remove[g.root] = drop
    return plan


def _is_channel(fold: tuple[str, int, float], g, j: int) -> bool:
    return any(fold[0] == name and fold[1] == idxs[j] for name, _, idxs in g.consumers)


def apply_plan(net: nn.Module, example: torch.Tensor, plan: ShrinkPlan) -> int:
    """Fold the constants into the consumers' biases, then remove the channels; returns parameters removed."""
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name, c, v in plan.folds:
            layer = modules[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device,
                                                      dtype=layer.weight.dtype))
            w = layer.weight[:, c]
            layer.bias += v * (w.reshape(w.shape[0], -1).sum(1) if w.dim() > 1 else w)
    return remove_channels(net, example, plan.remove)


def shrink(sparse: nn.Module, example: torch.Tensor, probe: torch.Tensor, constants: str = "fold") -> tuple[nn.Module, ShrinkPlan]:
    """A physically smaller copy of the sparse model ``sparse`` (eval mode, BatchNorm folded, zero-filter
    channels removed per ``constants``) and the plan it followed; ``sparse`` is untouched."""
    net = make_permanent(copy_net(sparse)).eval()
    fold_batchnorm(net)
    plan = shrink_plan(net, example, probe, constants)
    apply_plan(net, example, plan)
    return net.eval(), plan


# ----------------------------------------------------------------------------------- portfolio
def save_variant(net: nn.Module, path: str | Path) -> Path:
    """``PATH.safetensors`` (weights) + ``PATH.json`` (family, spec, config; BatchNorm folded)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"family": type(net).__name__, "spec": net.spec(),
                                                     "config": net.config, "folded": True}))
    return path


def load_variant(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A variant saved by ``save_variant``: its family rebuilt from the spec, BatchNorm folded, weights loaded
    strictly. The family must be one of ``FAMILIES``."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file() or not path.with_suffix(".safetensors").is_file():
        raise ConfigError(f"portfolio: variant {path} not found (need {path.stem}.json and {path.stem}.safetensors)")
    meta = json.loads(meta_path.read_text())
    cls = FAMILIES.get(meta.get("family"))
    if cls is None:
        raise ConfigError(f"portfolio: {meta_path} names family {meta.get('family')!r}; allowed: {', '.join(FAMILIES)}")
    net = cls(spec=meta["spec"], **meta["config"])
    if meta.get("folded"):
        fold_batchnorm(net)
    state = load_file(str(path.with_suffix(".safetensors")))
    modules = dict(net.named_modules())
    for key in state:  # a bias that a folded constant created on a layer built without one
        owner, _, attr = key.rpartition(".")
        if attr == "bias" and getattr(modules.get(owner), "bias", 0) is None:
            modules[owner].bias = nn.Parameter(torch.zeros_like(state[key]))
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


class Portfolio:
    """The smaller variants of every level, held in memory; ``switch(level)`` makes one the active model."""

    def __init__(self):
        self.variants: dict[int, nn.Module] = {}
        self.active_level: int | None = None

    def add(self, level: int, net: nn.Module) -> None:
        self.variants[int(level)] = net.eval()

    @property
    def levels(self) -> list[int]:
        return sorted(self.variants)

    def switch(self, level: int) -> nn.Module:
        """The variant of ``level``, now the active one (no copy, no load: it is already in memory)."""
        if level not in self.variants:
            raise KeyError(f"Portfolio.switch: no variant for level {level}; levels: {self.levels}")
        self.active_level = level
        return self.variants[level]

    @property
    def active(self) -> nn.Module | None:
        return None if self.active_level is None else self.variants[self.active_level]

    def memory_mb(self) -> float:
        """Weight memory of every variant held (parameters and buffers)."""
        return sum(weight_memory_mb(v) for v in self.variants.values())

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        for level, net in self.variants.items():
            save_variant(net, directory / f"level_{level:02d}")
        return directory


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------- the pruner
class DNNShifter:
    """See the module docstring. Every option is checked here, before anything trains."""

    def __init__(self, levels: int = 25, rate: float = 0.2, rewind_iter: int | None = None, prune_head: bool = False,
                 count_rule: str = "reference", constants: str = "fold", naive: bool = True,
                 level_epochs: float | None = None, probe_batch: int = 8, switch_repeats: int = 20,
                 save_portfolio: bool = True, method: str = "dnnshifter"):
        self.levels = check_int("pruner.levels", levels, 1)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
            raise ConfigError(f"pruner.rate: {rate!r} must be a fraction in (0, 1) (of the remaining weights pruned per level)")
        self.rate = float(rate)
        self.rewind_iter = check_int("pruner.rewind_iter", rewind_iter, 0, allow_none=True,
                                     hint=" (optimizer steps into the dense training; null: 3.2 % of them, the reference's)")
        self.prune_head = check_bool("pruner.prune_head", prune_head)
        self.count_rule = check_choice("pruner.count_rule", count_rule, COUNT_RULES, "count rule")
        self.constants = check_choice("pruner.constants", constants, CONSTANTS, "constants rule")
        self.naive = check_bool("pruner.naive", naive)
        self.level_epochs = check_epochs("pruner.level_epochs", level_epochs, allow_none=True)
        self.probe_batch = check_int("pruner.probe_batch", probe_batch, 1)
        self.switch_repeats = check_int("pruner.switch_repeats", switch_repeats, 1)
        self.save_portfolio = check_bool("pruner.save_portfolio", save_portfolio)
        self.method = method
        self.portfolio = Portfolio()

    def rewind_step(self, ctx) -> int:
        """The rewind point in optimizer steps, checked against the dense training's length."""
        if ctx.cfg.model.get("checkpoint"):
            raise ConfigError("model.checkpoint: DNNShifter rewinds to an early iteration of the dense training, which "
                              "a checkpoint does not hold; train the dense model in this run (model.checkpoint=null)")
        batch = int(getattr(ctx.task, "batch_size", 64))
        total = int(ctx.cfg.train.dense_epochs) * math.ceil(ctx.samples_per_epoch() / batch)
        step = round(REWIND_FRACTION * total) if self.rewind_iter is None else self.rewind_iter
        if step >= total:
            raise ConfigError(f"pruner.rewind_iter: {step} must be below the dense training's {total} optimizer steps "
                              f"(train.dense_epochs={ctx.cfg.train.dense_epochs})")
        return step

    def run(self, ctx) -> None:
        rewind = self.rewind_step(ctx)
        capture = RewindCapture(rewind)
        dense, dense_cost = ctx.dense(callbacks=[capture])
        if capture.state is None:
            raise ConfigError(f"pruner.rewind_iter: the dense training ended before step {rewind}")
        device = model_device(dense)
        example = ctx.example()
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
        probe = torch.randn(self.probe_batch, *example.shape[1:], generator=gen).to(device)
        names = list(prunable_layers(dense, include_head=self.prune_head))
        modules = dict(dense.named_modules())
        total = sum(modules[n].weight.numel() for n in names)
        epochs = self.level_epochs if self.level_epochs is not None else ctx.cfg.train.dense_epochs
        masks = {n: torch.ones_like(modules[n].weight, dtype=torch.bool) for n in names}
        parent, cost = dense, dense_cost.copy()
        dense_params = sum(p.numel() for p in dense.parameters())
        sparse_store: dict[int, nn.Module] = {}
        finals = []
        ctx.log(f"dnnshifter: {self.levels} levels of {self.rate:.0%} global magnitude pruning over {total} weights "
                f"({len(names)} layers), rewound to step {rewind}")
        for level in ctx.progress(range(1, self.levels + 1), desc="dnnshifter levels"):
            keep = level_keep(total, self.rate, level, self.count_rule, kept_count(masks))
            masks = magnitude_masks(parent, names, keep, masks)
            child = copy.deepcopy(dense)
            child.load_state_dict(capture.state)
            apply_masks(child, masks)
            ctx.finetune(child, epochs, cost)
            sparse = make_permanent(copy.deepcopy(child)).eval()
            sparse_store[level] = sparse
            prunable = [dict(sparse.named_modules())[n] for n in names]
            target = (1.0 - self.rate) ** level
            base = {"level": level, "target_density": round(target, 6), "rewind_iter": rewind,
                    "count_rule": self.count_rule}
            sp = ctx.record(self.method, level, sparse, cost, prunable=prunable,
                            sparsity=1.0 - kept_count(masks) / total, extra={**base, "variant": "sparse"})
            t0 = time.perf_counter()
            smaller, plan = shrink(sparse, example, probe, self.constants)
            shrink_ms = (time.perf_counter() - t0) * 1e3
            smaller.to(device)
            with torch.no_grad():
                diff = float((smaller(probe) - sparse(probe)).abs().max())
            self.portfolio.add(level, smaller)
            timing = self.switch_times(ctx, level, sparse, example, probe)
            extra = {**base, "variant": "smaller" if self.constants == "fold" else "naive",
                     "filters_removed": plan.removed, "dead_filters": plan.dead, "dead_kept": plan.kept,
                     "folded_constants": len(plan.folds), "max_abs_diff": diff, "shrink_ms": round(shrink_ms, 3),
                     **timing}
            sm_names = [n for n in names if n in dict(smaller.named_modules())]
            sm = ctx.record(self.method, level, smaller, cost, extra=extra,
                            prunable=[dict(smaller.named_modules())[n] for n in sm_names],
                            sparsity=1.0 - sum(p.numel() for p in smaller.parameters()) / dense_params)
            ctx.tracker.update(sm, compression=round(sp.params / sm.params, 4),
                               speedup=round(sp.latency_ms / sm.latency_ms, 4) if sm.latency_ms else None)
            finals.append(sm)
            if self.naive and self.constants == "fold":
                naive, nplan = shrink(sparse, example, probe, "drop")
                nv = ctx.record(self.method, level, naive.to(device), cost,
                                prunable=[dict(naive.named_modules())[n] for n in sm_names if n in dict(naive.named_modules())],
                                sparsity=1.0 - sum(p.numel() for p in naive.parameters()) / dense_params,
                                extra={**base, "variant": "naive", "filters_removed": nplan.removed,
                                       "dead_filters": nplan.dead})
                ctx.tracker.update(nv, value_change=round(nv.value - sp.value, 6),
                                   compression=round(sp.params / nv.params, 4))
            ctx.log(f"dnnshifter level {level}: density {kept_count(masks) / total:.4f}, {plan.dead} zero-filter "
                    f"channels, {plan.removed} removed ({plan.kept} kept), params {sp.params} -> {sm.params}, "
                    f"accuracy {sp.value:.4f} -> {sm.value:.4f} (max |diff| {diff:.2e})")
            parent = child
        self.summarise(ctx, sparse_store, finals, dense_cost)

    def switch_times(self, ctx, level: int, sparse: nn.Module, example: torch.Tensor, probe: torch.Tensor) -> dict:
        """In-memory switch vs reload from disk vs re-prune, median ms each (the variant is saved to disk here)."""
        device = model_device(sparse)
        path = save_variant(self.portfolio.variants[level], ctx.run_dir / "portfolio" / f"level_{level:02d}")
        r = self.switch_repeats
        return {"switch_ms": round(median_ms(lambda: self.portfolio.switch(level), r), 6),
                "reload_ms": round(median_ms(lambda: load_variant(path, device), r), 4),
                "reprune_ms": round(median_ms(lambda: shrink(sparse, example, probe, self.constants), max(1, r // 4)), 4)}

    def summarise(self, ctx, sparse_store: dict, finals: list, dense_cost) -> None:
        sparse_mb = sum(weight_memory_mb(m) for m in sparse_store.values())
        portfolio_mb = self.portfolio.memory_mb()
        sign = 1.0 if HIGHER_IS_BETTER.get(finals[0].metric, True) else -1.0
        best = max(finals, key=lambda p: sign * p.value)
        col = {k: [p.extra[k] for p in finals] for k in ("switch_ms", "reload_ms", "reprune_ms")}
        ctx.results[self.method] = {
            "value": best.value, "best_level": best.step, "levels": self.levels,
            "portfolio_mb": round(portfolio_mb, 4), "sparse_portfolio_mb": round(sparse_mb, 4),
            "memory_ratio": round(sparse_mb / portfolio_mb, 4) if portfolio_mb else None,
            **{f"median_{k}": round(statistics.median(v), 6) for k, v in col.items()},
            "reload_over_switch": round(statistics.median(col["reload_ms"]) / max(statistics.median(col["switch_ms"]), 1e-9), 1),
            "reprune_over_switch": round(statistics.median(col["reprune_ms"]) / max(statistics.median(col["switch_ms"]), 1e-9), 1),
            "train_samples": finals[-1].train_samples, "dense_samples": dense_cost.samples}
        if not self.save_portfolio:
            import shutil

            shutil.rmtree(ctx.run_dir / "portfolio", ignore_errors=True)
        ctx.log(f"dnnshifter portfolio: {len(self.portfolio.variants)} variants, {portfolio_mb:.3f} MB "
                f"(sparse models: {sparse_mb:.3f} MB)")

    def objective(self, ctx) -> float | None:
        return (ctx.results.get(self.method) or {}).get("value")


__all__ = ["DNNShifter", "Portfolio", "ShrinkPlan", "apply_plan", "current_masks", "level_keep", "load_variant",
           "magnitude_masks", "save_variant", "shrink", "shrink_plan"]
