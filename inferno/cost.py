"""The one cost model: parameters, MACs (all of them, and those of non-zero weights only), weight density,
measured latency (dense, and with 2:4 sparse kernels), peak memory, training cost.

Every measurement runs on the model's own device: example inputs (a tensor or a dict of tensors) are moved
to it first. MACs come from ``torch.utils.flop_counter`` (2 FLOPs per MAC). Torch has formulas for its CUDA
attention kernels (flash, memory-efficient, cuDNN) but none for the CPU one,
``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` dispatches to
on CPU, e.g. Hugging Face's ``sdpa`` attention), so attention MACs were silently dropped on CPU. Importing
this module registers torch's own SDPA count (``sdpa_flop_count``) for it and for the out-of-tree backends'
``_scaled_dot_product_fused_attention_overrideable``, so MACs no longer depend on the device. Like torch's
CUDA formulas, it counts the full T x T score matrix (QK^T and attention x V, each heads x T x T x head_dim
per sequence): the causal mask's skipped half is *not* subtracted.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def _register_sdpa_formulas() -> None:
    """The SDPA ops without a flop formula get torch's own shape-based count (full T x T, causal or not)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    ops = [op for n in names if (op := getattr(torch.ops.aten, n, None)) is not None and op not in flop_counter.flop_registry]
    if ops:
        @flop_counter.register_flop_formula(ops)
        def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_sdpa_formulas()


@dataclass
class Cost:
    params: int
    macs: int
    latency_ms: float
    peak_mem_mb: float
    effective_macs: int  # MACs of the non-zero weights only (weightless matmuls such as attention in full)
    density: float  # non-zero fraction of the prunable weights
    device: str  # where it was measured (cuda, cpu, ...)


# ----------------------------------------------------------------------------------- devices
def run_device(accelerator: str | None) -> torch.device:
    """The torch device of a run from ``hardware.accelerator`` (``gpu``/``cuda``: CUDA; ``auto``: CUDA when
    there is one). Models live there between fits, and costs are measured there."""
    if accelerator in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device({"gpu": "cuda"}.get(str(accelerator), str(accelerator)))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(obj, device):
    """A tensor, or a dict / list / tuple of them, on ``device`` (anything else unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _forward(model: nn.Module, example):
    """One forward; ``example`` must already be on the model's device (see ``to_device``)."""
    return model(**example) if isinstance(example, dict) else model(example)


# ----------------------------------------------------------------------------------- weights
def weighted_types() -> tuple[type, ...]:
    """The layers whose weights pruning zeroes: linears, convolutions, and transformers' ``Conv1D`` (GPT-2)
    when transformers is loaded (no model can hold one otherwise)."""
    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    hf = sys.modules.get("transformers.pytorch_utils")
    return types + (hf.Conv1D,) if hf is not None else types


def weighted_modules(model: nn.Module) -> list[nn.Module]:
    types = weighted_types()
    return [m for m in model.modules() if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _out_features(m: nn.Module) -> int:
    """Output features (channels) of a weighted layer: its output has ``numel / this`` positions, each
    computed with every weight once (MACs = positions x weight.numel(), also for grouped convolutions)."""
    return m.nf if hasattr(m, "nf") else m.weight.shape[0]  # transformers' Conv1D keeps (in, out) weights


def density(modules: Iterable[nn.Module]) -> float:
    """Non-zero fraction of the weights of ``modules`` (1.0 for none)."""
    nonzero = total = 0
    for m in modules:
        w = m.weight.detach()
        nonzero += int(torch.count_nonzero(w))
        total += w.numel()
    return nonzero / total if total else 1.0


# ----------------------------------------------------------------------------------- MACs
def count_macs_effective(model: nn.Module, example: torch.Tensor | dict) -> tuple[int, int]:
    """``(macs, effective_macs)`` of one forward over ``example``.

    ``macs``: every multiply-accumulate, per ``torch.utils.flop_counter`` (FLOPs / 2; attention counted on
    every device, see the module docstring). ``effective_macs``: the same minus, for every weighted layer
    (``weighted_types``), its zero weights times the output positions it computed in this forward (tokens for
    a linear, batch x output pixels for a convolution; hooks count them), i.e. the MACs a kernel skipping
    zero weights would do. Weightless matmuls (attention) count in full. Eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    layers = weighted_modules(model)
    positions: dict[nn.Module, int] = {}
    zeros: dict[nn.Module, int] = {}

    def hook(mod, _inp, out):
        positions[mod] = positions.get(mod, 0) + out.numel() // _out_features(mod)
        if mod not in zeros:  # counted while the weight is in memory (a streamed model's blocks are not after it)
            zeros[mod] = mod.weight.numel() - int(torch.count_nonzero(mod.weight.detach()))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _forward(model, to_device(example, model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    macs = int(counter.get_total_flops() // 2)
    skipped = sum(zeros.get(m, 0) * positions.get(m, 0) for m in layers)
    return macs, max(0, macs - skipped)


def count_macs(model: nn.Module, example: torch.Tensor | dict) -> int:
    """Multiply-accumulates of one forward pass over ``example`` (see ``count_macs_effective``)."""
    return count_macs_effective(model, example)[0]


# ----------------------------------------------------------------------------------- latency, memory
def measure_latency_ms(model: nn.Module, example, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``repeats`` timed forwards after ``warmup`` untimed ones, on the model's device
    (the inputs are moved there before timing; CUDA is synchronised around each forward)."""
    device = model_device(model)
    example = to_device(example, device)
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


def throughput(model: nn.Module, example: torch.Tensor, warmup: int = 2, repeats: int = 5) -> float:
    """Examples per second of inference on a batch ``example`` (its first dimension), from the median latency."""
    return example.shape[0] / (measure_latency_ms(model, example, warmup, repeats) / 1e3)


def decode_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 64, warmup: int = 1,
                        repeats: int = 3) -> float:
    """Tokens/s of greedy decoding (KV cache on) of exactly ``new_tokens`` tokens after the prompt ``input_ids``
    (the prefill included in the time, as a user waits for it), median over ``repeats`` after ``warmup`` runs."""
    device = model_device(model)
    ids = input_ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = getattr(model.config, "pad_token_id", None)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
              "do_sample": False, "use_cache": True, "pad_token_id": 0 if pad is None else pad,
              "temperature": None, "top_p": None, "top_k": None}
    rates = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync()
            if i >= warmup:
                rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return statistics.median(rates)


def weight_memory_mb(model: nn.Module) -> float:
    """Bytes of every parameter and buffer, in MiB (the memory the weights hold, before any activation)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


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

    The activation bytes come, on CUDA, from the allocator's peak above what was allocated before the forward
    (so other models living on the device do not count); elsewhere from a dispatch mode that follows every
    tensor an op creates until it is freed (so the figure is the same on any machine, unlike the process's
    resident size)."""
    device = model_device(model)
    example = to_device(example, device)
    inputs = list(example.values()) if isinstance(example, dict) else [example]
    resident = list(model.parameters()) + list(model.buffers()) + [t for t in inputs if isinstance(t, torch.Tensor)]
    static = sum(t.numel() * t.element_size() for t in resident)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            _forward(model, example)
        torch.cuda.synchronize(device)
        return (static + torch.cuda.max_memory_allocated(device) - before) / 2**20
    tracker = LiveBytes(resident)
    with torch.no_grad(), tracker:
        _forward(model, example)
    return (static + tracker.peak) / 2**20


def measure(model: nn.Module, example, latency_batch_size: int | None = None, warmup: int = 3, repeats: int = 10,
            prunable: Iterable[nn.Module] | None = None) -> Cost:
    """All inference costs of ``model`` on its own device. MACs and memory are per ``example`` (batch 1 for
    the MACs column); latency uses a batch of ``latency_batch_size`` copies of it when given. ``density``
    is over ``prunable``'s weights (default: every weighted layer, see ``weighted_types``)."""
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        example = to_device(example, device)
        lat_example = example
        if latency_batch_size and isinstance(example, torch.Tensor) and example.shape[0] != latency_batch_size:
            lat_example = example[:1].expand(latency_batch_size, *example.shape[1:]).contiguous()
        macs, effective = count_macs_effective(model, example)
        return Cost(
            params=count_params(model),
            macs=macs,
            latency_ms=measure_latency_ms(model, lat_example, warmup, repeats),
            peak_mem_mb=peak_memory_mb(model, example),
            effective_macs=effective,
            density=density(weighted_modules(model) if prunable is None else prunable),
            device=device.type,
        )
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- 2:4 sparse kernels
class SparseLatency(NamedTuple):
    ms: float | None  # latency with the 2:4 linears on sparse kernels (None: not measured)
    dense_ms: float | None  # the same copy (same dtype) before conversion, the fair baseline
    note: str  # why it was not measured, or what was measured (dtype, backend, layers converted / skipped)


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights of a row (what semi-structured kernels need)."""
    w = weight.detach()
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(-1, 4) != 0).sum(1) <= 2).all())


def measure_sparse_latency(model: nn.Module, example, modules: Iterable[nn.Module], warmup: int = 3,
                           repeats: int = 10) -> SparseLatency:
    """Latency with every 2:4-sparse layer of ``modules`` running on ``torch.sparse.to_sparse_semi_structured``
    kernels (cuSPARSELt, else CUTLASS), measured on a half-precision copy of the model (fp16, or the model's
    own bf16/fp16) against that copy before conversion.

    Those kernels need a CUDA GPU of compute capability >= 8.0, fp16/bf16 (or int8) 2-D weights whose
    shape is a multiple of the backend's block (cuSPARSELt fp16/bf16: 16 x 16; CUTLASS: 32 x 64), and
    exactly 2:4 sparsity (other N:M patterns have no kernel). Layers that fail a check stay dense and are
    named in the note; where nothing can be converted, ``ms`` is None and the note says why."""
    modules = list(modules)
    device = model_device(model)
    if device.type != "cuda":
        return SparseLatency(None, None, f"2:4 sparse kernels need a CUDA GPU; the model is on {device.type}")
    if torch.cuda.get_device_capability(device) < (8, 0):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return SparseLatency(None, None, f"2:4 sparse kernels need compute capability >= 8.0, this GPU has {cap}")
    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(m)] for m in modules if id(m) in names]
    skipped = [f"{names[id(m)]} (not 2:4)" for m in modules if id(m) in names and not is_2_4(m.weight)]
    if len(skipped) == len(targets):
        return SparseLatency(None, None, f"no prunable linear is 2:4 sparse ({len(targets)} checked); only 2:4 has sparse kernels")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"
    kind = f"{backend} {str(dtype).removeprefix('torch.')}"
    force, half = SparseSemiStructuredTensor._FORCE_CUTLASS, None
    try:
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "CUTLASS"
        half = copy.deepcopy(model).to(dtype).eval()  # the model itself stays as it is
        dense_ms = measure_latency_ms(half, example, warmup, repeats)
        layers = dict(half.named_modules())
        converted = 0
        for name in targets:
            mod = layers[name]
            if not is_2_4(mod.weight):
                continue
            try:
                mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach().contiguous()), requires_grad=False)
                converted += 1
            except RuntimeError as e:  # shape / dtype the backend refuses: stays dense
                skipped.append(f"{name} {tuple(mod.weight.shape)} ({str(e).splitlines()[0][:80]})")
        if not converted:
            return SparseLatency(None, dense_ms, f"{kind}: no layer could be converted: " + "; ".join(skipped))
        ms = measure_latency_ms(half, example, warmup, repeats)
    except (RuntimeError, NotImplementedError) as e:
        return SparseLatency(None, None, f"2:4 sparse kernels failed: {str(e).splitlines()[0][:160]}")
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = force
        del half
        torch.cuda.empty_cache()
    note = f"{kind}: {converted} of {len(targets)} layers on 2:4 kernels"
    return SparseLatency(ms, dense_ms, note + (f"; dense: {'; '.join(skipped)}" if skipped else ""))


# ----------------------------------------------------------------------------------- training cost
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
