"""``pruner=continual``: Continual Inference Networks (Hedegaard 2023) on a streaming task, with structured pruning.

The temporal model (``model=temporal_cnn``) is trained offline on windows (``ctx.dense()``). For every ratio in
``ratios`` a child is pruned structurally from it by the one CNN surgery (Torch-Pruning's dependency graph: every
block's convolutions, BatchNorms, residual adds, the embedding's width; ``importance`` scores the channels, the head
is kept) and fine-tuned ``finetune_epochs`` (ratio 0: the trained model itself). Each child is then recorded as

* ``variant=offline``: the model as trained, re-run on the sliding window every step -- one prediction recomputes
  the whole receptive field (``macs``: one such forward; ``latency_ms``: ``hardware.latency_batch_size`` windows);
* ``variant=step_<frame_kernel>`` for every entry of ``frame_kernels``: the same weights converted to the
  ``continual-inference`` library's modules (``inferno.models.continual.to_continual``) and run one step at a
  time over the test part as parallel streams (``streams``) -- ``macs``: one step of one stream, with the state
  of the earlier steps (``torch.utils.flop_counter``); ``latency_ms``: one step of ``latency_batch_size`` streams.
  ``library`` is the library's own step (a length-1 frame padded by ``k - 1``: ``k^2 C_in C_out`` MACs a
  convolution); ``matmul`` computes the same partial products as one matrix product (``k C_in C_out``).

The step-wise models' accuracy is measured on their own outputs (the val and test parts read as streams), and
``max_abs_diff`` is their largest logit difference from the offline model on the same windows (``check_tol``:
a larger one is an error, the conversion being exact up to float rounding). Extra columns: ``variant``, ``ratio``,
``frame_kernel``, ``receptive_field``, ``delay``, ``state_mb`` (the per-stream state), ``macs_ratio``
(offline / step MACs of the same child), ``channel_ratio`` and ``spec`` (the pruned widths).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import torch
from torch import nn

from inferno.cost import TrainingCost, count_macs
from inferno.errors import ConfigError, check_choice, check_int
from inferno.models.continual import FRAME_KERNELS, StepNet, TemporalConvNet, stream_logits, to_continual
from inferno.pruning.cnn.surgery import IMPORTANCES
from inferno.pruning.cnn.uniform import ChannelPruner, check_ratios
from inferno.training import accuracy, check_epochs


def state_bytes(state) -> int:
    """Bytes of the library's nested step state (tensors inside tuples and lists)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    return 0


@torch.no_grad()
def offline_logits(net: nn.Module, windows: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The offline model's logits on every window (``(n, window)`` ids), in batches, on the model's device."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat([net(windows[i:i + batch_size].to(device)).cpu() for i in range(0, len(windows), batch_size)])


def stream_inputs(ids: torch.Tensor, window: int, n_targets: int, step_net: StepNet) -> torch.Tensor:
    """The inputs a step-wise model reads to predict a part's first ``n_targets`` targets, ``targets[i] ==
    ids[i + window]``: its output after input ``window - 1 + i`` must be prediction ``i`` and ``stream_logits``
    gives prediction ``i`` after its input ``delay + i``, so the stream starts at ``window - 1 - delay``."""
    start = window - 1 - step_net.delay
    if start < 0:
        raise ConfigError(f"task.window: {window} is shorter than the model's receptive field "
                          f"{step_net.receptive_field}; set task.window >= {step_net.receptive_field}")
    return ids[start:start + n_targets + step_net.delay]


class ContinualPruner:
    """See the module docstring. Every option is checked here, before anything trains."""

    def __init__(self, ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75), importance: str = "l1",
                 finetune_epochs: float = 1, frame_kernels: Sequence[str] = ("matmul", "library"), streams: int = 64,
                 check_tol: float = 1e-4, method: str = "continual"):
        self.ratios = check_ratios(ratios)
        self.importance = check_choice("pruner.importance", importance, IMPORTANCES, "importance")
        if self.importance == "taylor":
            raise ConfigError("pruner.importance: taylor needs gradients this pruner does not collect; allowed: "
                              + ", ".join(i for i in IMPORTANCES if i != "taylor"))
        self.finetune_epochs = check_epochs("pruner.finetune_epochs", finetune_epochs)
        if isinstance(frame_kernels, str) or not isinstance(frame_kernels, Sequence):
            raise ConfigError(f"pruner.frame_kernels: {frame_kernels!r} must be a list from {', '.join(FRAME_KERNELS)}")
        self.frame_kernels = [check_choice("pruner.frame_kernels", k, FRAME_KERNELS, "frame kernel")
                              for k in frame_kernels]
        self.streams = check_int("pruner.streams", streams, 1)
        if isinstance(check_tol, bool) or not isinstance(check_tol, (int, float)) or not check_tol > 0:
            raise ConfigError(f"pruner.check_tol: {check_tol!r} must be a number > 0 (the largest logit difference "
                              "allowed between the step-wise and the offline model)")
        self.check_tol = float(check_tol)
        if not isinstance(method, str) or not method:
            raise ConfigError(f"pruner.method: {method!r} must be a non-empty name (the points' method column)")
        self.method = method

    def child(self, ctx, dense: nn.Module, dense_cost: TrainingCost, ratio: float):
        """``(child, cost, channel_ratio)``: the trained model pruned by ``ratio`` and fine-tuned."""
        if ratio == 0:
            return dense, dense_cost.copy(), 0.0
        child, cost = copy.deepcopy(dense), dense_cost.copy()
        pruner = ChannelPruner(child, ctx.example(), ratio, self.importance)
        pruner.step()
        ctx.finetune(child, self.finetune_epochs, cost)
        return child, cost, pruner.channel_ratio()

    def stream_accuracy(self, ctx, step_net: StepNet, split: str, reference: torch.Tensor | None = None):
        """``(accuracy, max |step - offline| logits)`` of the step-wise model read through ``split`` as streams."""
        ids, targets = ctx.task.stream(split)
        inputs = stream_inputs(ids, ctx.task.window, len(targets), step_net)
        logits = stream_logits(step_net, inputs, len(targets), self.streams,
                               progress=lambda s: ctx.progress(s, f"continual {split} steps")).cpu()
        diff = float((logits - reference).abs().max()) if reference is not None else None
        return float(accuracy(logits, targets)), diff

    def run(self, ctx) -> None:
        if not isinstance(ctx.net, TemporalConvNet):
            raise ConfigError(f"model: {ctx.model_name} ({type(ctx.net).__name__}) is not a temporal model; "
                              "pruner=continual needs model=temporal_cnn")
        window, rf = getattr(ctx.task, "window", None), ctx.net.receptive_field
        if window is None or window < rf:
            raise ConfigError(f"task.window: {window} is shorter than the model's receptive field {rf}; set "
                              f"task.window >= {rf}")
        dense, dense_cost = ctx.dense()
        hw = ctx.cfg.hardware
        metric = ctx.cfg.task.metric
        windows = ctx.task.splits["test"].tensors[0]
        best = None
        for i, ratio in enumerate(ctx.progress(self.ratios, desc="continual ratios"), start=1):
            child, cost, channel_ratio = self.child(ctx, dense, dense_cost, ratio)
            common = {"ratio": ratio, "channel_ratio": round(channel_ratio, 6), "spec": json.dumps(child.spec()),
                      "receptive_field": child.receptive_field, "importance": self.importance}
            offline = ctx.record(self.method, i, child, cost,
                                 extra={**common, "variant": "offline", "frame_kernel": "window", "delay": 0})
            reference = offline_logits(child, windows)
            for kernel in self.frame_kernels:
                step_net = to_continual(child, kernel).to(ctx.device)
                test_acc, diff = self.stream_accuracy(ctx, step_net, "test", reference)
                if diff > self.check_tol:
                    raise RuntimeError(f"continual: the {kernel} step-wise model's logits differ from the offline "
                                       f"model's by {diff:.3g} > pruner.check_tol={self.check_tol}")
                val_acc, _ = self.stream_accuracy(ctx, step_net, "val")
                step_net.prepare(1, hw.latency_batch_size)  # warm streams for the cost model's batches
                one = torch.zeros(1, dtype=torch.long)
                extra = {**common, "variant": f"step_{kernel}", "frame_kernel": kernel, "delay": step_net.delay,
                         "state_mb": round(state_bytes(step_net.state(1)) / 2**20, 6), "val_value": val_acc,
                         "max_abs_diff": diff}
                step_macs = count_macs(step_net, one.to(ctx.device))
                extra["macs_ratio"] = round(offline.macs / step_macs, 4) if step_macs else None
                point = ctx.record(self.method, i, step_net, cost, extra=extra, scores={metric: test_acc},
                                   prunable=[m for m in child.modules() if isinstance(m, (nn.Conv1d, nn.Linear))],
                                   example=one)
                step_net.reset()
                best = point if best is None or point.value > best.value else best
            ctx.log(f"continual ratio {ratio}: offline {offline.macs} MACs / {offline.latency_ms:.3f} ms per "
                    f"prediction, accuracy {offline.value:.4f}")
        ctx.results[self.method] = {"value": best.value, "ratio": best.extra["ratio"]}

    def objective(self, ctx) -> float | None:
        return (ctx.results.get(self.method) or {}).get("value")
