"""One run: build the model, task, pruner, hardware and loggers from the config, hand them to the pruner,
write the points. Returns the objective (the pruner's best quality) for sweepers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from inferno.config import build, build_node, config_message  # noqa: F401  (build_node: re-exported for callers of run)
from inferno.cost import TrainingCost, count_macs, measure, run_device, throughput, to_device
from inferno.errors import ConfigError, check_bool, check_choice, check_int, check_number
from inferno.tracking import AXES, Point, Tracker
from inferno.training import TrainConfig, Trainers, check_epochs, check_hardware

log = logging.getLogger("inferno")


@dataclass
class RunContext:
    """What a pruner gets: the model to start from, the task, trainers, the cost model and the tracker."""

    cfg: DictConfig
    net: nn.Module
    task: object
    trainers: Trainers
    tracker: Tracker
    train: TrainConfig
    run_dir: Path
    results: dict = field(default_factory=dict)  # what each method of the run reports to later ones
    dense_point: Point | None = None  # the start model's point (its costs are what budgets are relative to)
    _dense: tuple | None = field(default=None, repr=False)
    _fits: int = field(default=0, repr=False)  # fits without a curve name so far (their curves' default names)

    @property
    def model_name(self) -> str:
        return self.cfg.model.name

    @property
    def device(self) -> torch.device:
        """The run's one device (``hardware.accelerator``): models are measured there, inputs follow them."""
        return run_device(self.cfg.hardware.accelerator)

    def example(self, batch_size: int = 1) -> torch.Tensor:
        """The cost model's input (the task's ``example_input``) on the run's device."""
        return to_device(self.task.example_input(batch_size), self.device)

    def calib_batch(self, n: int = 64):
        x, y = self.task.splits["train"].tensors
        return x[:n].to(self.device), y[:n].to(self.device)

    def progress(self, items, desc: str):
        return tqdm(items, desc=desc, disable=not self.cfg.hardware.progress_bar)

    def samples_per_epoch(self) -> int:
        """Training examples one epoch processes (fewer under ``hardware.limit_batches``)."""
        n = len(self.task.splits["train"])
        if self.trainers.limit_batches:
            n = min(n, int(self.trainers.limit_batches) * self.task.batch_size)
        return n

    def macs(self, net: nn.Module) -> int:
        return count_macs(net, self.example())

    def finetune(self, net: nn.Module, epochs: float, cost: TrainingCost, train: TrainConfig | None = None,
                 val_history: list | None = None, callbacks: list | None = None, curve: str | None = None) -> None:
        """Train ``net`` in place (with ``train``, default the run's recipe) and add the examples it processed
        (and their MACs) to ``cost``; with a ``val_history`` list, every epoch's validation accuracy lands in it;
        ``callbacks``: extra Lightning callbacks of this fit. Its per-epoch training curves go to the tracker as
        ``curve`` (default ``<pruner>/fit<n>``, n counting this run's fits)."""
        curves: dict = {}
        samples = self.trainers.fit(net, self.task, epochs, train or self.train, val_history, callbacks, curves)
        cost.add(samples, self.macs(net))
        if curve is None:
            self._fits += 1
            curve = f"{self.cfg.pruner.name}/fit{self._fits}"
        self.tracker.add_curve(curve, curves)

    def evaluate(self, net: nn.Module, split: str = "test") -> dict[str, float]:
        """Every metric the task reports for ``net`` on ``split`` (``val`` selects, ``test`` reports)."""
        return self.task.evaluate(net, split, self.trainers)

    def dense(self, callbacks: list | None = None) -> tuple[nn.Module, TrainingCost]:
        """The trained start model and what it cost; trained once per run (or loaded from
        ``model.checkpoint``), saved as ``dense.safetensors`` and recorded as the ``dense`` point. ``callbacks``
        (Lightning callbacks) watch its training, when this call is the one that trains it."""
        if self._dense is None:
            net, cost = self.net.to(self.device), TrainingCost()
            ckpt = self.cfg.model.get("checkpoint")
            if ckpt:
                net.load_state_dict(load_checkpoint(ckpt, net, self.model_name))
            else:
                self.finetune(net, self.cfg.train.dense_epochs, cost, callbacks=callbacks, curve="dense/step0")
            self.save_net(net, "dense")
            self.dense_point = self.record("dense", 0, net, cost)
            self._dense = (net, cost)
        net, cost = self._dense
        return net, cost.copy()

    def set_dense(self, net: nn.Module, cost: TrainingCost, point: Point) -> None:
        """Adopt an already trained start model (a resumed search's) without recording it again."""
        net.to(self.device)
        self.net, self._dense, self.dense_point = net, (net, cost), point

    def save_net(self, net: nn.Module, name: str) -> Path:
        """``NAME.safetensors`` (weights) and, for spec'd models, ``NAME.json`` (architecture) in the run dir."""
        from safetensors.torch import save_file

        path = self.run_dir / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
        if hasattr(net, "spec"):
            (self.run_dir / f"{name}.json").write_text(json.dumps({"family": type(net).__name__, "spec": net.spec()}))
        return path

    def log(self, message: str) -> None:
        log.info(message)

    def record(
        self, method: str, step: int, net: nn.Module, cost: TrainingCost, extra: dict | None = None,
        sparsity: float | None = None, scores: dict[str, float] | None = None,
        prunable: Iterable[nn.Module] | None = None, density: float | None = None, example=None,
    ) -> Point:
        """Move ``net`` to the run's device, measure it (cost model, then the task's metrics), add its point.

        ``value`` is the task's primary metric on the test split; its other metrics become extra columns,
        and the primary metric on the validation split ``val_value`` where the task has one. ``sparsity``
        defaults to the fraction of the dense model's parameters removed (structured pruning); unstructured
        methods pass the fraction of zeros. ``scores`` skips the evaluation when the caller has it.
        ``density`` (non-zero fraction of the weights) is over ``prunable``'s weights (default: every
        linear / convolution of ``net``) unless given; the ``device`` column says where ``net`` ran. ``example``
        replaces the task's input for the cost model (a step-wise model's one step; its latency batch is
        ``hardware.latency_batch_size`` copies of it)."""
        hw = self.cfg.hardware
        net.to(self.device)
        mux = getattr(net, "mux_n", 1)  # a multiplexed encoder: one forward serves mux sentences
        example = self.example(mux) if example is None else to_device(example, self.device)
        c = measure(net, example, latency_batch_size=hw.latency_batch_size, repeats=hw.latency_repeats,
                    prunable=prunable)
        if mux > 1:  # MACs per sentence
            c = dataclasses.replace(c, macs=c.macs // mux, effective_macs=c.effective_macs // mux)
        extra = dict(extra or {})
        tb = getattr(self.task, "throughput_batch", None)
        if tb:  # sentences/s at the task's fixed batch and sequence length (encoders)
            extra.setdefault("throughput", round(throughput(net, self.example(tb), repeats=hw.latency_repeats), 2))
            extra.setdefault("mux_n", mux)
        if sparsity is None:
            base = sum(p.numel() for p in self._dense[0].parameters()) if self._dense else c.params
            sparsity = 1.0 - c.params / base
        metric = self.cfg.task.metric
        scores = dict(scores or self.evaluate(net, "test"))
        if getattr(self.task, "has_val", False) and "val_value" not in extra:
            extra["val_value"] = self.evaluate(net, "val")[metric]
        extra.update({k: v for k, v in scores.items() if k != metric})
        extra.setdefault("device", c.device)
        point = Point(
            method=method, step=step, model=self.model_name, task=self.cfg.task.name,
            sparsity=round(float(sparsity), 6), params=c.params, macs=c.macs,
            latency_ms=round(c.latency_ms, 4), peak_mem_mb=round(c.peak_mem_mb, 4),
            train_samples=cost.samples, train_macs=cost.macs, metric=metric,
            value=scores[metric], wall_s=round(self.tracker.elapsed(), 2), effective_macs=c.effective_macs,
            density=round(c.density if density is None else float(density), 6), extra=extra,
        )
        return self.tracker.add(point)


def check_checkpoint(path) -> None:
    """``model.checkpoint`` exists and its safetensors header (which covers the file's length) reads; checked by
    ``validate`` before anything runs, so a bad file fails before the run dir's earlier points are touched."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ConfigError(f"model.checkpoint: file {path} not found (a safetensors file, e.g. a run's dense.safetensors)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path, e: Exception) -> ConfigError:
    return ConfigError(f"model.checkpoint: {path} is not a readable safetensors file ({' '.join(str(e).split())})")


def load_checkpoint(path, net: nn.Module, model: str) -> dict:
    """``model.checkpoint``'s weights (safetensors only) when they fit ``net`` key for key and shape for shape;
    else a one-line ConfigError saying what does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_checkpoint(path)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    shapes = [k for k in set(want) & set(weights) if want[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", sorted(shapes))) if v]
        raise ConfigError(f"model.checkpoint: {path} does not fit model {model}: keys {', '.join(parts)}")
    return weights


# The task kinds each model kind runs (a model kind not listed runs tasks of its own kind).
TASK_KINDS = {"encoder": ("sequence_classification",), "temporal": ("streaming",)}


def validate(cfg: DictConfig) -> None:
    """Checks across groups that Hydra's schema cannot express; one line naming the key on failure."""
    runs = TASK_KINDS.get(cfg.model.kind, (cfg.model.kind,))
    if cfg.task.kind not in runs:
        need = [m for m, t in TASK_KINDS.items() if cfg.task.kind in t] or [cfg.task.kind]
        raise ConfigError(
            f"model: {cfg.model.name} is a {cfg.model.kind} model and cannot run task {cfg.task.name} "
            f"({cfg.task.kind}); pick a {' or '.join(need)} model"
        )
    head, labels = cfg.model.get("num_classes"), cfg.task.get("num_classes")
    if head is not None and labels is not None and head != labels:
        raise ConfigError(f"model.num_classes: the head has {head} classes but task {cfg.task.name} has {labels} labels")
    allowed = cfg.pruner.get("kinds")
    if allowed and cfg.model.kind not in allowed:
        raise ConfigError(f"pruner: {cfg.pruner.name} supports {', '.join(allowed)} models, not {cfg.model.kind}")
    axes = plot_axes(cfg)
    if not isinstance(axes, list) or not axes or any(a not in AXES for a in axes):
        raise ConfigError(f"plot.x_axes: {axes!r} must be a non-empty list of point columns from {', '.join(AXES)}")
    check_hardware(cfg.hardware)
    check_int("seed", cfg.get("seed"), 0)
    check_epochs("train.dense_epochs", cfg.train.get("dense_epochs"))
    check_search_knobs(cfg.pruner)
    check_logger(cfg.get("logger"))
    if cfg.model.get("checkpoint"):
        check_checkpoint(cfg.model.checkpoint)
    if cfg.model.kind == "causal_lm" and cfg.model.get("path"):  # a folder model: whole, before anything loads
        from inferno.tasks.lm import check_model_folder

        tokenizer = cfg.task.get("tokenizer")  # the task reads its tokenizer from the model folder (the default)
        check_model_folder(cfg.model.path, tokenizer=bool(tokenizer) and Path(str(tokenizer)) == Path(str(cfg.model.path)))
    accelerator = cfg.hardware.accelerator
    if run_device(accelerator).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hardware.accelerator: {accelerator} needs a CUDA GPU and torch {torch.__version__} sees "
                          "none; use hardware=cpu")


def check_search_knobs(pruner: DictConfig) -> None:
    """The keys every search shares (``budget``, ``resume``, ``stop_after``), of ``pruner`` and of the methods
    ``pruner=compare`` runs, before any pruner is built."""
    from inferno.search.loop import BUDGET_KEYS

    nodes = [("pruner", pruner)] + [(f"pruner.methods.{k}", v) for k, v in (pruner.get("methods") or {}).items()
                                    if OmegaConf.is_dict(v)]
    for where, node in nodes:
        if "budget" in node and node.budget is not None:
            if not OmegaConf.is_dict(node.budget):
                raise ConfigError(f"{where}.budget: {node.budget!r} must be a mapping of {', '.join(BUDGET_KEYS)} (e.g. "
                                  f"{where}.budget.macs=0.5)")
            for k, v in node.budget.items():
                if v is not None:
                    check_number(f"{where}.budget.{k}", v, 0, low_open=True)
        if "resume" in node:
            check_bool(f"{where}.resume", node.resume)
        if "stop_after" in node:
            check_int(f"{where}.stop_after", node.stop_after, 0, allow_none=True)


def plot_axes(cfg: DictConfig):
    """``plot.x_axes``: the cost columns ``curve.png`` plots quality against (one panel each)."""
    node = cfg.get("plot") or {}
    axes = node.get("x_axes", ["macs", "train_samples"])
    return OmegaConf.to_container(axes) if OmegaConf.is_config(axes) else axes


# The modes W&B accepts (``logger.wandb.mode``; checked before wandb is started, which refuses others in a traceback).
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def logger_nodes(node) -> dict:
    """``cfg.logger``: one node per selected logger option, by name (``logger=[wandb,mlflow]``); empty for
    ``logger=none``. Entries without a ``_target_`` (set to null by an override) are left out."""
    if node is None or not OmegaConf.is_dict(node):
        return {}
    return {str(k): v for k, v in node.items() if OmegaConf.is_dict(v) and v.get("_target_")}


def check_logger(node) -> None:
    for name, lg in logger_nodes(node).items():
        if str(lg.get("_target_", "")).endswith("WandbLogger") and "mode" in lg:
            check_choice(f"logger.{name}.mode", lg.mode, WANDB_MODES, "mode")


@contextmanager
def exclusive(path: Path | None):
    """Hold an exclusive lock on ``path``.lock (POSIX; nothing for None or elsewhere): the jobs of a parallel sweep
    that share one SQLite MLflow store create its tables one at a time (at once, alembic's migrations collide)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Every selected logger, each writing under ``run_dir`` (MLflow into its ``tracking_uri``'s store)."""
    nodes = logger_nodes(cfg.get("logger"))
    if not nodes:
        return []
    os.environ.setdefault("WANDB_SILENT", "true")
    out = []
    for name, node in nodes.items():
        uri = str(node.get("tracking_uri") or "")
        store = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if store is not None:  # SQLite does not make the store's folder
            store.parent.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive(store):
                logger = instantiate(node, save_dir=str(run_dir))
                if store is not None:
                    logger.experiment  # noqa: B018  (creates the store's tables, experiment and run, under the lock)
            out.append(logger)
        except InstantiationException as e:  # a logger's bad value: one line naming the group
            if isinstance(e.__cause__, (ValueError, TypeError, OSError)):
                raise ConfigError(config_message(f"logger.{name}", e.__cause__)) from e
            raise
    return out


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Execute one configured run in ``run_dir`` (Hydra's output directory by default)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.hardware.num_threads or torch.get_num_threads())
    pruner = build(cfg, "pruner")  # first: a bad pruner value fails before any data is read
    task = build(cfg, "task")
    if hasattr(pruner, "check"):  # pruner x task combinations refused from the config, before the model loads
        pruner.check(task)
    net = build(cfg, "model")
    task.setup()
    trainers = Trainers(**OmegaConf.to_container(cfg.hardware, resolve=True))
    train = TrainConfig(**{k: v for k, v in OmegaConf.to_container(cfg.train).items() if k in TrainConfig.__dataclass_fields__})
    tracker = Tracker(run_dir, build_loggers(cfg, run_dir), OmegaConf.to_container(cfg, resolve=True),
                      x_axes=tuple(plot_axes(cfg)))
    ctx = RunContext(cfg=cfg, net=net, task=task, trainers=trainers, tracker=tracker, train=train, run_dir=run_dir)
    pruner.run(ctx)
    objective = pruner.objective(ctx) if hasattr(pruner, "objective") else None
    if objective is None:  # the pruner's best point, else the start model's
        best = tracker.best().get(cfg.pruner.name) or tracker.best().get("dense")
        objective = best["value"] if best else float("nan")
    objective = float(objective)
    tracker.finish(objective, ctx.results)
    return objective

