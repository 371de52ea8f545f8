"""The one search loop that greedy layer-wise pruning, random sampling, the supernet and the grid share:
propose -> transfer -> fine-tune -> evaluate -> select, one step at a time, with the state saved after
every step so that rerunning the same command after a crash continues where it stopped and ends with the
same result (bit-identical weights on CPU: every training run is seeded by its place in the search).

Resuming is trusted only when nothing that changes the result changed: the state directory is named by a
digest (:func:`state_key`) of the resolved model, task (not where its data lies), training recipe, hardware
settings, seed and pruner options, of the sha256 of every data file the task reads, and of the code (the
installed ``inferno`` version and its sources). A step's save is atomic as a whole (:class:`StateStore`), and
every replayed point carries ``resumed=True`` (points computed by the process: ``resumed=False``).

Trainings that do not depend on each other (a greedy step's children) can run in worker processes
(:meth:`SearchLoop.fit`, ``workers > 1``): each worker builds the task and the Trainers from the run's config
once, gets the network and its seed by position, and sends the trained weights back; the loop records the
points in the serial order, so the results are those of the serial run (bitwise where every process uses the
same number of torch threads, e.g. ``hardware.num_threads=1``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from inferno.cost import TrainingCost
from inferno.errors import ConfigError
from inferno.tracking import Point
from inferno.training import TrainConfig, Trainers

BUDGET_KEYS = ("macs", "params", "latency_ms")
# ``hardware`` keys that change how a run looks, never what it computes: left out of the state key.
PRESENTATIONAL_HARDWARE = ("progress_bar",)
DIGEST_CACHE = "file_digests.json"  # in ``paths.state_dir``: sha256 per (path, size, mtime, ctime)


# constructor options that change how a search runs, never what it computes: left out of its state key
RUN_CONTROL = ("stop_after", "resume", "parallel_children")


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

    def check(self, method: str, required: bool = True, measured: bool = True) -> None:
        """At construction: ``required``, at least one limit is set; ``measured=False`` (a method that checks
        its budget on untrained networks, before any latency can be measured), no latency limit."""
        if required and all(v is None for v in asdict(self).values()):
            raise ConfigError(f"pruner.budget: set at least one of macs, params{', latency_ms' if measured else ''}")
        if not measured and self.latency_ms is not None:
            raise ConfigError(f"pruner.budget.latency_ms: {method} checks budgets before training; use macs or params")

    def limits(self, start: dict) -> dict[str, float]:
        return {k: (v * start[k] if v <= 1 else v) for k, v in asdict(self).items() if v is not None}

    @staticmethod
    def fits(figures: dict, limits: dict) -> bool:
        return all(float(figures[k]) <= v for k, v in limits.items())


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or all of ``data``, whatever kills the process (a unique
    temporary name beside it, flushed to disk, then renamed over it)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a file with exactly ``data`` (its size first: a truncated file costs no read)."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_DIGESTS: dict[str, str] = {}  # this process's file digests, keyed like the on-disk cache


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file's bytes, cached per (absolute path, size, mtime, ctime): in the process, and in
    ``cache_dir/file_digests.json`` across processes, so a large data file is read once, not per run."""
    path = Path(path).resolve()
    if not path.is_file():
        return "missing"
    key = _stat_key(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    disk: dict = {}
    cache = Path(cache_dir) / DIGEST_CACHE if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            disk = json.loads(cache.read_text())
        except (OSError, ValueError):  # unreadable cache: recompute, rewrite
            disk = {}
    digest = disk.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if cache is not None:
            disk = {k: v for k, v in disk.items() if not k.startswith(f"{path}|")}  # drop the file's stale entries
            disk[key] = digest
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(cache, json.dumps(disk, indent=0, sort_keys=True).encode())
            except OSError:  # a read-only state dir only costs the re-hash next time
                pass
    _DIGESTS[key] = digest
    return digest


@lru_cache(maxsize=1)
def code_version() -> dict:
    """What identifies the code computing a search: the installed ``inferno`` version, a sha256 of the
    ``inferno`` package's ``.py`` sources (so a bug fix never replays an answer the old code gave) and the
    versions of the numerical libraries under it. Computed once per process (the code it runs is fixed)."""
    root = Path(__file__).resolve().parents[1]  # the inferno package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        version = importlib.metadata.version("inferno")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"inferno": version, "source_sha256": h.hexdigest(), "python": sys.version.split()[0],
            "torch": torch.__version__, "lightning": L.__version__, "numpy": np.__version__}


def data_digests(task, cache_dir: str | Path | None = None) -> dict[str, str]:
    """sha256 of every file ``task`` reads (its ``data_files()``), keyed by file name: what the data is,
    not where it lies (a moved data folder resumes; a changed byte starts afresh)."""
    out = {}
    for f in (task.data_files() if hasattr(task, "data_files") else []):
        f = Path(f)
        out[f.name if f.name not in out else f"{f.parent.name}/{f.name}"] = file_digest(f, cache_dir)
    return out


def state_key(cfg, task, options: dict) -> dict:
    """Everything that changes a search's result, as JSON: the resolved ``model`` (a checkpoint by its
    content), ``task`` (its data by content, not ``data_dir``), ``train``, ``hardware`` (but
    ``PRESENTATIONAL_HARDWARE``), ``seed``, the pruner's ``options``, the data files' and the code's digests."""
    def node(name):
        return OmegaConf.to_container(cfg[name], resolve=True) if cfg.get(name) is not None else None

    key = {name: node(name) for name in ("model", "task", "train", "hardware")}
    cache_dir = cfg.paths.state_dir if cfg.get("paths") is not None else None
    if key["task"]:
        key["task"].pop("data_dir", None)  # where the data lies does not change the search; what it is does
    if key["model"] and key["model"].get("checkpoint"):
        key["model"]["checkpoint"] = file_digest(key["model"]["checkpoint"], cache_dir)
    if key["hardware"]:
        key["hardware"] = {k: v for k, v in key["hardware"].items() if k not in PRESENTATIONAL_HARDWARE}
        key["hardware"]["torch_threads"] = torch.get_num_threads()  # what num_threads=null resolved to here
    key["seed"] = cfg.get("seed")
    key["search"] = json.loads(json.dumps(options, default=str))
    key["data"] = data_digests(task, cache_dir)
    key["code"] = code_version()
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


# The only network classes a state file may name, by the name it stores: loading never imports what a file
# says (a state file is data, not code); a family a search saves is added here.
STATE_CLASSES = {
    "inferno.models.microcnn:MicroCNN": ("inferno.models.microcnn", "MicroCNN"),
    "inferno.models.resnet20:ResNet20": ("inferno.models.resnet20", "ResNet20"),
    "inferno.search.supernet:ElasticMicroCNN": ("inferno.search.supernet", "ElasticMicroCNN"),
}


def state_class(name: str) -> type:
    """The registered class ``name`` (``module:qualname``) stands for; a ValueError for any other name."""
    if name not in STATE_CLASSES:
        raise ValueError(f"state names network class {name!r}, not one of {', '.join(STATE_CLASSES)}")
    module, qualname = STATE_CLASSES[name]
    return getattr(importlib.import_module(module), qualname)


def class_name(net: nn.Module) -> str:
    cls = type(net)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name not in STATE_CLASSES or state_class(name) is not cls:
        raise TypeError(f"{name} is not in inferno.search.loop.STATE_CLASSES; register it to save it in search state")
    return name


class StateStore:
    """A search's state on disk: ``state.json`` (scalars, the points so far) and one safetensors file per
    network (weights; its ``spec`` goes in the JSON so it can be rebuilt).

    A save is atomic as a whole: network files are named by their content (``<sha256>.safetensors``, never
    overwritten with other weights), ``state.json`` names the files of its step and replaces the
    previous one in one rename, and only then are the files no ``state.json`` names any more removed. A
    process killed anywhere in between leaves the previous step's ``state.json`` beside the very files it
    names; ``load`` ignores leftovers and the next ``save`` sweeps them."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def save(self, state: dict, nets: dict[str, nn.Module], key: dict | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if key is not None and not (self.path / "key.json").is_file():  # what the directory's digest is of
            _write_atomic(self.path / "key.json", json.dumps(key, indent=1, sort_keys=True, default=str).encode())
        specs = {}
        for name, net in nets.items():
            data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()})
            file = f"{hashlib.sha256(data).hexdigest()[:24]}.safetensors"
            if not _holds(self.path / file, data):  # weights already saved (the start model's, a copy) written once;
                _write_atomic(self.path / file, data)  # a damaged file of that name (pruner.resume=false) rewritten
            specs[name] = {"class": class_name(net), "spec": net.spec(), "config": net.config,
                           "file": file}
        _fsync_dir(self.path)  # the weights' names are on disk before the state that names them
        _write_atomic(self.path / "state.json", json.dumps({"state": state, "specs": specs}, default=str).encode())
        _fsync_dir(self.path)  # the step counts as done only once this lands
        self.sweep({s["file"] for s in specs.values()})

    def sweep(self, keep: set[str]) -> None:
        """Remove the weights ``state.json`` no longer names and temporaries of interrupted writes."""
        for f in self.path.iterdir():
            if (f.name.endswith(".safetensors") and f.name not in keep) or f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)

    def load(self) -> tuple[dict, dict[str, nn.Module]]:
        """The saved state and its networks, rebuilt from registered classes only (:data:`STATE_CLASSES`) and
        weights read through safetensors; a damaged directory raises (``run`` turns that into one line)."""
        data = json.loads((self.path / "state.json").read_text())
        nets = {}
        for name, entry in data["specs"].items():
            net = state_class(entry["class"])(spec=entry["spec"], **entry["config"])
            net.load_state_dict(load_file(str(self.path / entry.get("file", f"{name}.safetensors"))))
            nets[name] = net
        return data["state"], nets


@dataclass
class Fit:
    """One training of a search: ``net`` trained in place for ``epochs`` with recipe ``train`` (None: the run's),
    seeded by its position ``where``; ``val_history``: the validation accuracy after every epoch is kept."""

    net: nn.Module
    epochs: float
    where: tuple
    train: TrainConfig | None = None
    val_history: bool = False


@dataclass
class Fitted:
    """What a :class:`Fit` did: training examples processed, the per-epoch validation accuracies (or None) and
    the per-epoch training curves (``train_loss``, ``train_accuracy``, ``val_accuracy``: lists by epoch)."""

    samples: int
    history: list | None = None
    curves: dict = field(default_factory=dict)


_WORKER: dict = {}  # in a worker process: the task and Trainers built once from the run's config


def _init_worker(cfg: dict, threads: int) -> None:
    import inferno.config  # noqa: F401  (the resolvers conf/ uses)
    from inferno.config import build

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(cfg)
    task = build(cfg, "task")
    task.setup()
    _WORKER.update(task=task, trainers=Trainers(**{**OmegaConf.to_container(cfg.hardware), "progress_bar": False}))


def _train(trainers: Trainers, task, net: nn.Module, epochs: float, seed: int, train: TrainConfig,
           val_history: bool) -> Fitted:
    """One seeded training of ``net`` in place: the same here and in a worker process."""
    L.seed_everything(seed, workers=True, verbose=False)
    history, curves = ([] if val_history else None), {}
    return Fitted(trainers.fit(net, task, epochs, train, history, curves=curves), history, curves)


def _fit_in_worker(net: nn.Module, epochs: float, seed: int, train: TrainConfig, val_history: bool):
    fitted = _train(_WORKER["trainers"], _WORKER["task"], net, epochs, seed, train, val_history)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, fitted


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
        self._pool: ProcessPoolExecutor | None = None

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
        return {k: v for k, v in vars(self).items() if k not in RUN_CONTROL and not k.startswith("_")}

    def state_key(self, ctx) -> dict:
        """What this search's saved state is valid for (see :func:`state_key`)."""
        return state_key(ctx.cfg, ctx.task, self.options())

    def state_dir(self, ctx, key: dict | None = None) -> Path:
        """``paths.state_dir/<label>-<digest of state_key>``: a rerun finds the state only if nothing that
        changes the result changed."""
        return Path(ctx.cfg.paths.state_dir) / f"{self.label}-{key_digest(key or self.state_key(ctx))}"

    @property
    def label(self) -> str:
        return self.method if not self.variant else f"{self.method}[{self.variant}]"

    def run(self, ctx) -> None:
        try:
            self._run(ctx)
        finally:
            self.close_workers()

    def _run(self, ctx) -> None:
        key = self.state_key(ctx)
        store = StateStore(self.state_dir(ctx, key))
        if self.resume and store.exists():
            try:
                state, nets = store.load()
            except Exception as e:  # whatever broke it, the message says where and what to do
                detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line, whatever the error says
                raise ConfigError(f"pruner.resume: the saved search state {store.path} cannot be read ({detail}); "
                                  "start over with pruner.resume=false (overwrites it) or delete that directory") from e
            nets = {k: v.to(ctx.device) for k, v in nets.items()}  # saved on the CPU; the run's nets live on its device
            self.replay(ctx, state, nets)
            ctx.log(f"{self.method}: resumed from {store.path} at step {state['step']}")
            if state.get("finished"):  # nothing left to do: its points are replayed, its results and files restored
                ctx.results[self.label] = state["results"]
                for name in state.get("artifacts", []):
                    ctx.save_net(nets[f"artifact.{name}"], name)
                return
        else:
            state, nets = self.start(ctx)
            state.setdefault("step", 0)
            state.setdefault("points", [])
            self.mark_fresh(ctx, state)
            store.save(state, nets, key)
        ran = 0
        while not self.done(ctx, state, nets):
            if self.stop_after is not None and ran >= self.stop_after:
                raise SearchInterrupted(f"{self.method}: stopped after {ran} step(s) (pruner.stop_after); rerun to resume")
            self.seed(ctx, "step", state["step"])  # whatever a step draws before seeding itself, drawn by position
            self.step(ctx, state, nets)
            state["step"] += 1
            store.save(state, nets, key)
            ran += 1
        self.seed(ctx, "finish")
        artifacts: dict[str, nn.Module] = {}
        with _capture_saves(ctx, artifacts):
            self.finish(ctx, state, nets)
        state.update(finished=True, results=ctx.results.get(self.label), artifacts=sorted(artifacts))
        store.save(state, {**nets, **{f"artifact.{name}": net for name, net in artifacts.items()}}, key)

    @staticmethod
    def replay(ctx, state: dict, nets: dict[str, nn.Module]) -> None:
        """Add the saved points to the run (``resumed=True``); the start model's once per run, adopted with
        its network by the run unless an earlier search of the run already has one."""
        for row in state["points"]:
            point = Point(**{**row, "extra": {**row["extra"], "resumed": True}})
            if row["method"] != "dense":
                ctx.tracker.add(point)
            elif ctx.dense_point is None and "dense" in nets:  # once per run, whichever search has it
                ctx.set_dense(nets["dense"], TrainingCost(**state["dense_cost"]), ctx.tracker.add(point))

    @staticmethod
    def mark_fresh(ctx, state: dict) -> None:
        """``resumed=False`` on the points ``start`` recorded in this process (the start model's), in the saved
        state and, where the tracker can update a point, in points.csv."""
        update = getattr(ctx.tracker, "update", None)
        for row in state["points"]:
            if "resumed" in row["extra"]:
                continue
            match = next((p for p in getattr(ctx.tracker, "points", []) if p == Point(**row)), None)
            row["extra"]["resumed"] = False
            if match is not None and update is not None:
                update(match, resumed=False)

    # ---------------------------------------------------------------- shared pieces
    def seed(self, ctx, *where: int) -> None:
        """Seed by position in the search, so a resumed run repeats exactly what an uninterrupted one does."""
        L.seed_everything(self.seed_value(ctx, *where), workers=True, verbose=False)

    @staticmethod
    def seed_value(ctx, *where) -> int:
        # crc32, not hash(): str hashes differ from process to process
        return (int(ctx.cfg.seed) * 1_000_003 + zlib.crc32(repr(where).encode())) % 2**32

    def fit(self, ctx, fits: list[Fit], workers: int = 1) -> list[Fitted]:
        """Every :class:`Fit` done, its network trained in place: here one after the other, or with ``workers`` > 1
        in that many worker processes (kept for the rest of the search), each training seeded exactly as here."""
        if workers <= 1 or len(fits) <= 1:
            return [_train(ctx.trainers, ctx.task, f.net, f.epochs, self.seed_value(ctx, *f.where), f.train or ctx.train,
                           f.val_history) for f in fits]
        pool = self.workers(ctx, workers)
        futures = [pool.submit(_fit_in_worker, f.net.cpu(), f.epochs, self.seed_value(ctx, *f.where),
                               f.train or ctx.train, f.val_history) for f in fits]
        out = []
        for f, future in zip(fits, ctx.progress(futures, desc=f"{self.method}: {len(fits)} fits on {workers} workers")):
            weights, fitted = future.result()
            f.net.load_state_dict(weights)
            f.net.to(ctx.device)
            out.append(fitted)
        return out

    def workers(self, ctx, n: int) -> ProcessPoolExecutor:
        """``n`` worker processes (spawned: no state shared with this one but the run's config), started once."""
        if self._pool is None:
            cfg = OmegaConf.to_container(ctx.cfg, resolve=True)
            threads = ctx.cfg.hardware.num_threads or max(1, torch.get_num_threads() // n)
            self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(cfg, threads))
        return self._pool

    def close_workers(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def curve_name(self, step: int, where: tuple) -> str:
        """The training curves' name of the fit at ``where`` recorded as point ``step``: ``<method>/step<step>``,
        then ``/child<k>`` for a step's k-th child (``where == (step index, k)``) or the rest of ``where``
        (e.g. ``/final``, ``/grid_1_2_3``)."""
        name = f"{self.method}/step{step}" if not self.variant else f"{self.method}-{self.variant}/step{step}"
        if len(where) == 2 and all(isinstance(w, int) for w in where):
            return f"{name}/child{where[1]}"
        rest = [str(w) for w in where if not (isinstance(w, int) and w == step)]
        return f"{name}/{'_'.join(rest)}" if rest else name

    def train_and_record(self, ctx, state: dict, net: nn.Module, epochs: float, cost: TrainingCost, where: tuple,
                         step: int, extra: dict, train=None, val_history: bool = False,
                         fitted: Fitted | None = None) -> Point:
        """Seeded training of ``net`` (its examples added to ``cost``; recipe ``train``, default the run's),
        then a recorded point whose ``train_samples`` is the cumulative ``cost`` and ``own_samples`` this
        training alone. ``val_history``: validate after every epoch; the accuracies go in the ``val_history``
        column. ``fitted``: that training was already done (:meth:`fit`); only its cost is added here."""
        if fitted is None:
            fitted = self.fit(ctx, [Fit(net, epochs, where, train, val_history)])[0]
        before = cost.samples
        cost.add(fitted.samples, ctx.macs(net))
        ctx.tracker.add_curve(self.curve_name(step, where), fitted.curves)
        history = fitted.history
        if history is not None:
            extra = {**extra, "val_history": history}
        extra = {"own_samples": cost.samples - before, "search_samples": cost.samples - state["dense_cost"]["samples"],
                 "search_macs": cost.macs - state["dense_cost"]["macs"], **extra}
        if self.variant:
            extra["variant"] = self.variant
        extra.setdefault("resumed", False)  # computed by this process (a replayed point says True)
        point = ctx.record(self.method, step, net, cost, extra=extra)
        state["points"].append({**asdict(point)})
        return point


@contextmanager
def _capture_saves(ctx, into: dict):
    """While ``finish`` runs: a copy of every network it saves to the run dir (``ctx.save_net``), by file name,
    so that a rerun of a finished search writes the same files into its own run dir."""
    save, own = ctx.save_net, "save_net" in vars(ctx)

    def capture(net, name, *args, **kw):
        if hasattr(net, "spec") and hasattr(net, "config"):
            into[name] = copy.deepcopy(net).cpu()
        return save(net, name, *args, **kw)

    ctx.save_net = capture
    try:
        yield into
    finally:
        if own:
            ctx.save_net = save
        else:
            del ctx.save_net  # the instance attribute goes; the method shows through again


def spec_summary(net: nn.Module) -> str:
    """A short human-readable architecture: ``B=2 D=[2,1] out=[64,96]``."""
    spec = net.spec()
    depth = [len(s) for s in spec["stages"]]
    outs = [s[0]["out"] for s in spec["stages"]]
    return f"B={len(depth)} D={depth} out={outs}"
