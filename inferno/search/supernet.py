"""``pruner=supernet``: an once-for-all-style elastic network ("data-center pre-training") over greedy's
depth/width space, trained once by progressive shrinking, then searched.

The supernet is the trained start model (the largest network; its training is counted) with one extra
classifier per possible last stage. Elastic depth uses the first D' blocks of the first B' stages;
elastic width keeps the leading channels of the stem and of every layer of a stage (masks on the outputs of each BN and
SE reduction, which computes exactly the function of the sliced sub-network). Progressive shrinking:
``depth_epochs`` sampling B', D' at full width, then ``width_epochs`` sampling widths too, each batch
distilled from the frozen largest network (KL at temperature ``kd_temperature``, weight ``kd_weight``).
Then ``candidates`` random sub-networks within the budget (plus the largest one within it) are extracted,
their BatchNorm statistics recalibrated, evaluated on the validation split; the best is fine-tuned.
Its training cost (``train_samples``/``train_macs``) is the start model's, the whole supernet training (the
teacher's forwards included in ``train_macs``) and the fine-tuning: the cost when the user trains the supernet
on the task. ``deploy_samples``/``deploy_macs`` is the fine-tuning alone: the thesis' "data-center
pre-training" view, where the supernet was pretrained elsewhere and its cost is not the user's.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from inferno.cost import TrainingCost, count_macs, count_params
from inferno.errors import ConfigError, check_int
from inferno.models.microcnn import MicroCNN
from inferno.search.loop import Budget, SearchLoop, spec_summary
from inferno.search.moves import leading_slice_transfer
from inferno.search.random_sampling import check_width_choices, sample_arch, scale_spec, scale_width
from inferno.training import ClassificationModule, check_epochs

PHASES = ("depth", "width", "search")


class ElasticMicroCNN(MicroCNN):
    """A MicroCNN whose depth and per-stage widths can be shrunk at run time (``set_active``)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        outs = [st[-1].spec()["out"] for st in self.stages]
        self.exit_heads = nn.ModuleList(nn.Linear(o, self.head.out_features) for o in outs[:-1])
        self.active: dict | None = None
        for mod in [self.stem[1]] + [m for b in self.blocks() for m in self._masked(b)]:
            mod.keep = None
            mod.register_forward_hook(_mask_channels)

    def blocks(self):
        return [b for st in self.stages for b in st]

    @staticmethod
    def _masked(block):
        mods = [block.bn1, block.bn2, block.bn3, block.se.reduce]
        return mods + ([block.shortcut[1]] if isinstance(block.shortcut, nn.Sequential) else [])

    def set_active(self, arch: dict | None) -> None:
        """``arch = {"depths": [...], "widths": [...], "stem": f}`` (one entry per active stage) or None for
        the largest."""
        self.active = arch
        stem = arch.get("stem", 1.0) if arch else 1.0
        self.stem[1].keep = None if stem == 1.0 else scale_width(self.stem[0].out_channels, stem)
        for i, st in enumerate(self.stages):
            f = arch["widths"][i] if arch and i < len(arch["widths"]) else 1.0
            for b in st:
                s = {k: None if f == 1.0 else scale_width(n, f) for k, n in b.spec().items()}
                b.bn1.keep = b.bn2.keep = s["mid"]
                b.bn3.keep = s["out"]
                b.se.reduce.keep = s["se"]
                if isinstance(b.shortcut, nn.Sequential):
                    b.shortcut[1].keep = s["out"]

    def forward(self, x):
        depths = self.active["depths"] if self.active else [len(st) for st in self.stages]
        x = self.stem(x)
        for st, d in zip(self.stages, depths):
            for b in st[:d]:
                x = b(x)
        head = self.head if len(depths) == len(self.stages) else self.exit_heads[len(depths) - 1]
        return head(torch.flatten(self.pool(x), 1))

    def extract(self, arch: dict | None) -> MicroCNN:
        """The stand-alone MicroCNN of ``arch`` carrying the supernet's (leading-slice) weights."""
        if arch is None:
            arch = {"depths": [len(st) for st in self.stages], "widths": [1.0] * len(self.stages)}
        spec = scale_spec(self.spec(), **arch)
        child = MicroCNN(spec=spec, **self.config)
        leading_slice_transfer(self, child)
        b = len(arch["depths"])
        head = self.head if b == len(self.stages) else self.exit_heads[b - 1]
        with torch.no_grad():
            child.head.weight.copy_(head.weight[:, : child.head.in_features])
            child.head.bias.copy_(head.bias)
        return child


def _mask_channels(mod, inp, out):
    if mod.keep is None or mod.keep >= out.shape[1]:
        return out
    mask = torch.zeros(out.shape[1], device=out.device, dtype=out.dtype)
    mask[: mod.keep] = 1
    return out * mask.view(1, -1, *([1] * (out.dim() - 2)))


class SupernetModule(ClassificationModule):
    """Progressive-shrinking training: a random sub-network per batch, distilled from the largest one."""

    def __init__(self, net: ElasticMicroCNN, teacher: nn.Module, sample, macs_of, kd_weight: float, temperature: float,
                 train=None, max_epochs: int = 1):
        super().__init__(net, train, max_epochs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.sample, self.macs_of = sample, macs_of
        self.kd_weight, self.temperature = kd_weight, temperature
        self.teacher_macs = macs_of(None)
        self.macs_seen = 0

    def training_step(self, batch, _):
        x, y = batch
        arch = self.sample()
        self.net.set_active(arch)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        if self.kd_weight > 0:
            with torch.no_grad():
                t = self.teacher(x)
            T = self.temperature
            kd = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
            loss = (1 - self.kd_weight) * loss + self.kd_weight * kd
        self.samples_seen += len(y)
        self.macs_seen += len(y) * (self.macs_of(arch) + (self.teacher_macs if self.kd_weight > 0 else 0))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss


class Supernet(SearchLoop):
    method = "supernet"

    def __init__(self, depth_epochs: int = 3, width_epochs: int = 3, candidates: int = 12,
                 width_choices=(1.0, 0.75, 0.5), kd_weight: float = 0.5, kd_temperature: float = 2.0,
                 recalibration_batches: int = 8, **kw):
        super().__init__(**kw)
        for key, v in (("depth_epochs", depth_epochs), ("width_epochs", width_epochs),
                       ("finetune_epochs", self.finetune_epochs)):
            check_epochs(f"pruner.{key}", v)
        check_width_choices(width_choices)
        self.budget.check(self.method, required=False, measured=False)
        check_int("pruner.candidates", candidates, 1)
        if not 0 <= kd_weight <= 1:
            raise ConfigError(f"pruner.kd_weight: {kd_weight} must lie in [0, 1]")
        if not kd_temperature > 0:
            raise ConfigError(f"pruner.kd_temperature: {kd_temperature} must be positive")
        check_int("pruner.recalibration_batches", recalibration_batches, 0)
        self.depth_epochs, self.width_epochs, self.candidates = depth_epochs, width_epochs, candidates
        self.width_choices = list(width_choices)
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.recalibration_batches = recalibration_batches

    def start(self, ctx):
        if not isinstance(ctx.net, MicroCNN):
            raise ConfigError(f"pruner: supernet is defined for microcnn models, not {ctx.cfg.model.name}")
        dense, cost = ctx.dense()
        supernet = ElasticMicroCNN(spec=dense.spec(), **dense.config)
        supernet.load_state_dict(dense.state_dict(), strict=False)  # exit heads start fresh
        p = ctx.dense_point
        limits = self.budget.limits({"macs": p.macs, "params": p.params, "latency_ms": p.latency_ms})
        state = {"dense_cost": vars(cost), "cost": vars(cost.copy()), "limits": limits, "points": [asdict(p)],
                 "chosen": None}
        return state, {"dense": dense, "supernet": supernet}

    def done(self, ctx, state, nets):
        return state["step"] >= len(PHASES)

    def _sampler(self, ctx, nets, phase: str, rng: random.Random):
        spec = nets["supernet"].spec()
        choices = self.width_choices if phase != "depth" else [1.0]
        return lambda: sample_arch(rng, spec, choices)

    def _macs_of(self, ctx, supernet):
        cache = {}

        def macs(arch):
            key = repr(arch)
            if key not in cache:
                cache[key] = count_macs(supernet.extract(arch), ctx.example())
            return cache[key]

        return macs

    def step(self, ctx, state, nets):
        phase = PHASES[state["step"]]
        supernet = nets["supernet"]
        self.seed(ctx, state["step"])
        rng = random.Random(int(ctx.cfg.seed) * 104729 + state["step"])
        if phase in ("depth", "width"):
            epochs = self.depth_epochs if phase == "depth" else self.width_epochs
            module = SupernetModule(supernet, copy.deepcopy(nets["dense"]), self._sampler(ctx, nets, phase, rng),
                                    self._macs_of(ctx, supernet), self.kd_weight, self.kd_temperature, ctx.train, epochs)
            ctx.log(f"supernet: {phase} phase, {epochs} epoch(s)")
            samples = ctx.trainers.fit_module(module, ctx.task, epochs)
            supernet.set_active(None)
            state["cost"]["samples"] += samples
            state["cost"]["macs"] += module.macs_seen
            return
        # search: candidates within the budget, BN recalibrated, chosen on the validation split
        sample = self._sampler(ctx, nets, "width", rng)
        x = ctx.example()
        archs = []
        largest = {"depths": [len(st) for st in supernet.stages], "widths": [1.0] * len(supernet.stages), "stem": 1.0}
        pool = [largest] + [sample() for _ in range(50 * self.candidates)]
        drawn = ctx.progress(pool, desc=f"supernet: candidate pool (the first {self.candidates} within the budget)")
        for arch in drawn:
            net = supernet.extract(arch)
            if arch not in archs and Budget.fits({"macs": count_macs(net, x), "params": count_params(net)}, state["limits"]):
                archs.append(arch)
            if len(archs) >= self.candidates:
                break
        drawn.close()
        ctx.log(f"supernet: {len(archs)} candidate(s) within {state['limits']}")
        if not archs:
            raise ConfigError(f"pruner.budget: no supernet sub-network within {state['limits']}")
        best = None
        for arch in ctx.progress(archs, desc="supernet candidates"):
            net = self.recalibrate(ctx, supernet.extract(arch))
            val = ctx.evaluate(net, "val")[ctx.cfg.task.metric]
            if best is None or val > best[0]:
                best = (val, arch)
        state["chosen"] = best[1]
        state["candidates_evaluated"] = len(archs)
        nets["chosen"] = self.recalibrate(ctx, supernet.extract(best[1]))

    @torch.no_grad()
    def recalibrate(self, ctx, net: nn.Module) -> nn.Module:
        """Reset BatchNorm running statistics to the sub-network's own (cumulative average over a few batches)."""
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        net.to(ctx.device).train()
        for i, (x, _) in enumerate(ctx.task.train_dataloader()):
            if i >= self.recalibration_batches:
                break
            net(x.to(ctx.device))
        for m in bns:
            m.momentum = 0.1
        return net.eval()

    def finish(self, ctx, state, nets):
        net, cost = nets["chosen"], TrainingCost(**state["cost"])
        before = cost.macs
        p = self.train_and_record(ctx, state, net, self.finetune_epochs, cost, ("final",), len(PHASES),
                                  {"phase": "final", "arch": spec_summary(net), "choice": state["chosen"],
                                   "candidates": state.get("candidates_evaluated")})
        # the "data-center pre-training" view: the supernet was trained elsewhere, the user pays the fine-tuning
        deploy = {"deploy_samples": p.extra["own_samples"], "deploy_macs": cost.macs - before}
        state["points"][-1]["extra"].update(deploy)
        ctx.tracker.update(p, **deploy)
        ctx.save_net(net, "supernet_final")
        ctx.results[self.label] = {"train_samples": cost.samples, "train_macs": cost.macs, "limits": state["limits"],
                                    "value": p.value, **deploy}
