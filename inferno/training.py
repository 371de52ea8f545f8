"""Lightning modules and the Trainer built from the ``hardware`` config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from inferno.cost import run_device

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging interval.*")


@dataclass
class TrainConfig:
    """How a model is trained or fine-tuned (the ``train`` config node)."""

    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # onecycle (warm-up then anneal) | constant
    nesterov: bool = True  # SGD only

    def __post_init__(self):
        from inferno.errors import check_bool, check_choice, check_number

        check_choice("train.optimizer", self.optimizer, OPTIMIZERS, "optimizer")
        check_choice("train.schedule", self.schedule, SCHEDULES, "schedule")
        check_number("train.lr", self.lr, 0, low_open=True)
        check_number("train.weight_decay", self.weight_decay, 0)
        check_number("train.momentum", self.momentum, 0, 1, high_open=True)
        check_number("train.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_bool("train.nesterov", self.nesterov)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (None values ignored): a method's own recipe over the run's ``train``."""
        from dataclasses import asdict

        return TrainConfig(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})


def check_epochs(key: str, epochs, allow_none: bool = False):
    """Epochs are a whole number >= 0 or a fraction below 1 (that fraction of one epoch's batches)."""
    from inferno.errors import ConfigError

    if epochs is None and allow_none:
        return None
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0 or (
            epochs >= 1 and epochs != int(epochs)):
        raise ConfigError(f"{key}: {epochs!r} must be a whole number of epochs >= 0 or a fraction below 1")
    return epochs


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "constant")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
# One process, one device: every pruner runs its fits, evaluations and cost measurements in the run's process
# (README "Scale-out": sweeps and parallel children spread work over processes; multi-process data parallelism
# was removed, see there why).
STRATEGIES = ("auto", "single_device")


def precisions() -> tuple[str, ...]:
    """The precision strings Lightning's Trainer accepts (from its own type, so the list follows Lightning)."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    return typing.get_args(_PRECISION_INPUT_STR)


def check_hardware(hw) -> None:
    """Every ``hardware`` knob, before any data or model is loaded; one line naming the key on failure."""
    from inferno.errors import ConfigError, check_bool, check_choice, check_int

    check_choice("hardware.accelerator", hw.get("accelerator"), ACCELERATORS, "accelerator")
    if hw.get("devices") != 1:
        raise ConfigError(f"hardware.devices: {hw.get('devices')!r}; a run uses exactly 1 device (spread work with "
                          "pruner.parallel_children or a sweep launcher, README: Scale-out)")
    strategy = hw.get("strategy")
    if strategy not in STRATEGIES:
        raise ConfigError(f"hardware.strategy: {strategy!r} is not supported; allowed: {', '.join(STRATEGIES)} "
                          "(multi-process training was removed, README: Scale-out)")
    check_choice("hardware.precision", str(hw.get("precision")), precisions(), "precision")
    check_int("hardware.num_threads", hw.get("num_threads"), 1, allow_none=True)
    check_int("hardware.limit_batches", hw.get("limit_batches"), 1, allow_none=True)
    check_int("hardware.latency_batch_size", hw.get("latency_batch_size"), 1)
    check_int("hardware.latency_repeats", hw.get("latency_repeats"), 1)
    for key in ("progress_bar", "deterministic"):
        check_bool(f"hardware.{key}", hw.get(key))


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits`` (..., classes) against integer ``target`` through torchmetrics (micro
    average: the fraction of correct predictions, as a float tensor)."""
    return multiclass_accuracy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), num_classes=logits.shape[-1],
                               average="micro")


class ClassificationModule(L.LightningModule):
    """Fine-tunes and evaluates any classifier ``nn.Module``; counts the training examples it sees."""

    def __init__(self, net: nn.Module, train: TrainConfig | None = None, max_epochs: int = 1):
        super().__init__()
        self.net = net
        self.train_cfg = train or TrainConfig()
        self.max_epochs = max_epochs
        self.samples_seen = 0
        self.results: dict[str, float] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)
        self.samples_seen += len(y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        # epoch means (example-weighted) for the training curves (TrainingCurves)
        self.log("train_loss_epoch", loss.detach(), on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_accuracy", accuracy(logits.detach(), y), on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, split: str):
        x, y = batch
        logits = self(x)
        self.log(f"{split}_loss", F.cross_entropy(logits, y), batch_size=len(y), prog_bar=True)
        self.log(f"{split}_accuracy", accuracy(logits, y), batch_size=len(y), prog_bar=True)

    def validation_step(self, batch, _):
        self._eval_step(batch, "val")

    def test_step(self, batch, _):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        c = self.train_cfg
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                  nesterov=c.nesterov and c.momentum > 0)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        if c.schedule == "constant":
            return opt
        steps = max(1, self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ValHistory(L.Callback):
    """Collects the validation accuracy at the end of every epoch's validation loop."""

    def __init__(self, out: list):
        self.out = out

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.out.append(float(trainer.callback_metrics["val_accuracy"]))


class TrainingCurves(L.Callback):
    """Per-epoch training curves of one fit into ``out``: ``train_loss`` and ``train_accuracy`` (means over the
    epoch's training examples) and, where a validation loader is used, ``val_accuracy``."""

    def __init__(self, out: dict):
        self.out = out

    def on_train_epoch_end(self, trainer, module):
        m = trainer.callback_metrics
        for key, name in (("train_loss_epoch", "train_loss"), ("train_accuracy", "train_accuracy")):
            if key in m:
                self.out.setdefault(name, []).append(float(m[key]))

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking and "val_accuracy" in trainer.callback_metrics:
            self.out.setdefault("val_accuracy", []).append(float(trainer.callback_metrics["val_accuracy"]))


class Trainers:
    """Builds Lightning Trainers from the ``hardware`` config; one per fit, as each child is a new model.

    Lightning moves a model to the accelerator for a fit or an evaluation and back to the CPU at its end;
    ``fit``/``evaluate`` put it back on the run's ``device``, where it stays."""

    def __init__(self, accelerator="cpu", devices=1, precision="32-true", strategy="auto", progress_bar=True,
                 deterministic=False, fast_dev_run=False, limit_batches=None, **_ignored):
        self.kw = {"accelerator": accelerator, "devices": devices, "precision": precision, "strategy": strategy}
        self.device = run_device(accelerator)
        self.progress_bar, self.deterministic = progress_bar, deterministic
        self.fast_dev_run, self.limit_batches = fast_dev_run, limit_batches

    def make(self, max_epochs: float = 1) -> L.Trainer:
        """A Trainer for ``max_epochs``; a fraction below 1 trains on that fraction of one epoch's batches."""
        limits = {}
        if self.limit_batches:
            limits = {k: self.limit_batches for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches")}
        if 0 < max_epochs < 1:
            limits["limit_train_batches"] = (
                max(1, int(self.limit_batches * max_epochs)) if self.limit_batches else float(max_epochs)
            )
            max_epochs = 1
        elif max_epochs != int(max_epochs):
            from inferno.errors import ConfigError

            raise ConfigError(f"epochs: {max_epochs} must be a whole number of epochs or a fraction below 1")
        return L.Trainer(
            max_epochs=int(max_epochs), logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=self.progress_bar, deterministic=self.deterministic, fast_dev_run=self.fast_dev_run,
            num_sanity_val_steps=0, **limits, **self.kw,
        )

    def fit(self, net: nn.Module, task, epochs: float, train: TrainConfig | None = None,
            val_history: list | None = None, callbacks: list | None = None, curves: dict | None = None) -> int:
        """Train ``net`` in place for ``epochs`` on ``task``; returns the number of training examples processed.
        With a ``val_history`` list, the validation accuracy after every epoch is appended to it; ``callbacks``
        are extra Lightning callbacks for this fit (e.g. one that keeps the weights of an early iteration);
        with a ``curves`` dict, the per-epoch training curves land in it (:class:`TrainingCurves`)."""
        return self.fit_module(ClassificationModule(net, train, epochs), task, epochs, val_history, callbacks, curves)

    def fit_module(self, module: ClassificationModule, task, epochs: float, val_history: list | None = None,
                   callbacks: list | None = None, curves: dict | None = None) -> int:
        """Fit any ClassificationModule (e.g. a supernet's) on ``task``'s training split; examples processed;
        ``curves``: a dict the per-epoch training curves land in."""
        if epochs > 0:
            module.net.train()
            kw = {}
            if val_history is not None:
                kw = {"val_dataloaders": task.val_dataloader()}
            trainer = self.make(epochs)
            if val_history is not None:
                trainer.callbacks.append(_ValHistory(val_history))
            if curves is not None:
                trainer.callbacks.append(TrainingCurves(curves))
            trainer.callbacks.extend(callbacks or [])
            trainer.fit(module, train_dataloaders=task.train_dataloader(), **kw)
        module.net.to(self.device)
        return module.samples_seen

    def evaluate(self, net: nn.Module, task, split: str = "test") -> float:
        """Accuracy of ``net`` on ``split`` (``val`` for selection, ``test`` for reporting)."""
        module = ClassificationModule(net)
        trainer = self.make()
        loader = task.val_dataloader() if split == "val" else task.test_dataloader()
        fn = trainer.validate if split == "val" else trainer.test
        res = fn(module, dataloaders=loader, verbose=False)[0]
        net.to(self.device)
        return float(res[f"{split}_accuracy"])
