"""The one cost model: parameters, MACs, measured latency, peak memory, training cost."""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Cost:
    params: int
    macs: int
    latency_ms: float
    peak_mem_mb: float


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor | dict) -> int:
    """Multiply-accumulates of one forward pass over ``example``, per ``torch.utils.flop_counter``
    (which counts 2 FLOPs per MAC). Counted in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _forward(model, example)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def _forward(model: nn.Module, example):
    return model(**example) if isinstance(example, dict) else model(example)


def measure_latency_ms(model: nn.Module, example, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``repeats`` timed forwards after ``warmup`` untimed ones."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            _forward(model, example)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes held by tensors that ops create, freed when the tensors die; keeps the maximum."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        # storages already held before the forward (weights, buffers, inputs): views of them cost nothing
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in resident}

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def peak_memory_mb(model: nn.Module, example) -> float:
    """Peak memory of one inference forward: weights, buffers and inputs plus the most activation bytes
    alive at once.

    On CUDA this is the allocator's own peak; elsewhere a dispatch mode follows every tensor an op creates
    until it is freed (so the figure is the same on any machine, unlike the process's resident size)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            _forward(model, example)
        return torch.cuda.max_memory_allocated(device) / 2**20
    inputs = list(example.values()) if isinstance(example, dict) else [example]
    resident = list(model.parameters()) + list(model.buffers()) + [t for t in inputs if isinstance(t, torch.Tensor)]
    static = sum(t.numel() * t.element_size() for t in resident)
    tracker = LiveBytes(resident)
    with torch.no_grad(), tracker:
        _forward(model, example)
    return (static + tracker.peak) / 2**20


def measure(model: nn.Module, example, latency_batch_size: int | None = None, warmup: int = 3, repeats: int = 10) -> Cost:
    """All inference costs of ``model``. MACs and memory are per ``example`` (batch 1 for the MACs column);
    latency uses a batch of ``latency_batch_size`` copies of it when given."""
    was_training = model.training
    model.eval()
    try:
        lat_example = example
        if latency_batch_size and isinstance(example, torch.Tensor) and example.shape[0] != latency_batch_size:
            lat_example = example[:1].expand(latency_batch_size, *example.shape[1:]).contiguous()
        return Cost(
            params=count_params(model),
            macs=count_macs(model, example),
            latency_ms=measure_latency_ms(model, lat_example, warmup, repeats),
            peak_mem_mb=peak_memory_mb(model, example),
        )
    finally:
        model.train(was_training)


@dataclass
class TrainingCost:
    """Training effort spent so far: examples processed, and the same weighted by forward MACs per example."""

    samples: int = 0
    macs: int = 0

    def add(self, samples: int, macs_per_sample: int) -> None:
        self.samples += int(samples)
        self.macs += int(samples) * int(macs_per_sample)

    def copy(self) -> TrainingCost:
        return TrainingCost(self.samples, self.macs)
