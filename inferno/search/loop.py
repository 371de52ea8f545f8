"""The one search loop that greedy layer-wise pruning, random sampling and the supernet share:
propose -> transfer -> fine-tune -> evaluate -> select, one step at a time, with the state saved after
every step so that rerunning the same command after a crash continues where it stopped and ends with the
same result (bit-identical weights on CPU: every training run is seeded by its place in the search).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError
from inferno.tracking import Point

BUDGET_KEYS = ("macs", "params", "latency_ms")


class SearchInterrupted(RuntimeError):
    """Raised by ``stop_after`` (a deliberate crash, to test and demonstrate resuming)."""


@dataclass
class Budget:
    """Limits on the cost model's figures; a value <= 1 is a fraction of the start model's, above 1 absolute."""

    macs: float | None = None
    params: float | None = None
    latency_ms: float | None = None

    def __post_init__(self):
        for k, v in asdict(self).items():
            if v is not None and v <= 0:
                raise ConfigError(f"pruner.budget.{k}: {v} must be positive (<= 1: fraction of the start model, > 1: absolute)")

    def limits(self, start: dict) -> dict[str, float]:
        return {k: (v * start[k] if v <= 1 else v) for k, v in asdict(self).items() if v is not None}

    @staticmethod
    def fits(figures: dict, limits: dict) -> bool:
        return all(float(figures[k]) <= v for k, v in limits.items())


class StateStore:
    """A search's state on disk: ``state.json`` (scalars, the points so far) and one safetensors file
    per network (weights; its ``spec`` goes in the JSON so it can be rebuilt)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def save(self, state: dict, nets: dict[str, nn.Module]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        specs = {}
        for name, net in nets.items():
            tmp = self.path / f"{name}.safetensors.tmp"
            save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
            os.replace(tmp, self.path / f"{name}.safetensors")
            cls = type(net)
            specs[name] = {"class": f"{cls.__module__}:{cls.__qualname__}", "spec": net.spec(), "config": net.config}
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps({"state": state, "specs": specs}, default=str))
        os.replace(tmp, self.path / "state.json")  # the step counts as done only once this lands

    def load(self) -> tuple[dict, dict[str, nn.Module]]:
        data = json.loads((self.path / "state.json").read_text())
        nets = {}
        for name, entry in data["specs"].items():
            module, qualname = entry["class"].split(":")
            cls = getattr(importlib.import_module(module), qualname)
            net = cls(spec=entry["spec"], **entry["config"])
            net.load_state_dict(load_file(str(self.path / f"{name}.safetensors")))
            nets[name] = net
        return data["state"], nets


class SearchLoop:
    """Subclasses say how to start (``start``), what one step does (``step``), when to stop (``done``)
    and what to do at the end (``finish``); the loop keeps the state, the points and the resuming."""

    method = "search"

    def __init__(self, budget: dict | None = None, finetune_epochs: int = 1, stop_after: int | None = None,
                 resume: bool = True, variant: str | None = None):
        self.variant = variant  # a label for ablations of one method (a `variant` column in points.csv)
        self.budget = Budget(**(budget or {}))
        self.finetune_epochs = finetune_epochs
        self.stop_after = stop_after
        self.resume = resume

    # ---------------------------------------------------------------- what subclasses implement
    def start(self, ctx) -> tuple[dict, dict[str, nn.Module]]:
        raise NotImplementedError

    def step(self, ctx, state: dict, nets: dict[str, nn.Module]) -> None:
        raise NotImplementedError

    def done(self, ctx, state: dict, nets: dict[str, nn.Module]) -> bool:
        raise NotImplementedError

    def finish(self, ctx, state: dict, nets: dict[str, nn.Module]) -> None:
        pass

    # ---------------------------------------------------------------- the loop
    def options(self) -> dict:
        """What identifies this search's state (its constructor options, minus run-control knobs)."""
        return {k: v for k, v in vars(self).items() if k not in ("stop_after", "resume") and not k.startswith("_")}

    def state_dir(self, ctx) -> Path:
        cfg = ctx.cfg
        key = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "task", "train")}
        key["task"].pop("data_dir", None)  # where the data lies does not change the search
        key["seed"] = cfg.seed
        key["search"] = json.loads(json.dumps(self.options(), default=str))
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return Path(cfg.paths.state_dir) / f"{self.label}-{digest}"

    @property
    def label(self) -> str:
        return self.method if not self.variant else f"{self.method}[{self.variant}]"

    def run(self, ctx) -> None:
        store = StateStore(self.state_dir(ctx))
        if self.resume and store.exists():
            state, nets = store.load()
            nets = {k: v.to(ctx.device) for k, v in nets.items()}  # saved on the CPU; the run's nets live on its device
            for row in state["points"]:
                if row["method"] != "dense":
                    ctx.tracker.add(Point(**row))
                elif ctx.dense_point is None and "dense" in nets:  # once per run, whichever search has it
                    ctx.set_dense(nets["dense"], TrainingCost(**state["dense_cost"]), ctx.tracker.add(Point(**row)))
            ctx.log(f"{self.method}: resumed from {store.path} at step {state['step']}")
            if state.get("finished"):  # nothing left to do: its points are replayed, its results restored
                ctx.results[self.label] = state["results"]
                return
        else:
            state, nets = self.start(ctx)
            state.setdefault("step", 0)
            state.setdefault("points", [])
            store.save(state, nets)
        ran = 0
        while not self.done(ctx, state, nets):
            if self.stop_after is not None and ran >= self.stop_after:
                raise SearchInterrupted(f"{self.method}: stopped after {ran} step(s) (pruner.stop_after); rerun to resume")
            self.step(ctx, state, nets)
            state["step"] += 1
            store.save(state, nets)
            ran += 1
        self.finish(ctx, state, nets)
        state.update(finished=True, results=ctx.results.get(self.label))
        store.save(state, nets)

    # ---------------------------------------------------------------- shared pieces
    def seed(self, ctx, *where: int) -> None:
        """Seed by position in the search, so a resumed run repeats exactly what an uninterrupted one does."""
        # crc32, not hash(): str hashes differ from process to process
        L.seed_everything((int(ctx.cfg.seed) * 1_000_003 + zlib.crc32(repr(where).encode())) % 2**32, workers=True,
                          verbose=False)

    def train_and_record(self, ctx, state: dict, net: nn.Module, epochs: float, cost: TrainingCost, where: tuple,
                         step: int, extra: dict, train=None, val_history: bool = False) -> Point:
        """Seeded training of ``net`` (its examples added to ``cost``; recipe ``train``, default the run's),
        then a recorded point whose ``train_samples`` is the cumulative ``cost`` and ``own_samples`` this
        training alone. ``val_history``: validate after every epoch; the accuracies go in the ``val_history``
        column."""
        self.seed(ctx, *where)
        before = cost.samples
        history = [] if val_history else None
        ctx.finetune(net, epochs, cost, train, history)
        if history is not None:
            extra = {**extra, "val_history": history}
        extra = {"own_samples": cost.samples - before, "search_samples": cost.samples - state["dense_cost"]["samples"],
                 "search_macs": cost.macs - state["dense_cost"]["macs"], **extra}
        if self.variant:
            extra["variant"] = self.variant
        point = ctx.record(self.method, step, net, cost, extra=extra)
        state["points"].append({**asdict(point)})
        return point


def spec_summary(net: nn.Module) -> str:
    """A short human-readable architecture: ``B=2 D=[2,1] out=[64,96]``."""
    spec = net.spec()
    depth = [len(s) for s in spec["stages"]]
    outs = [s[0]["out"] for s in spec["stages"]]
    return f"B={len(depth)} D={depth} out={outs}"
