"""Benchmark of the sequential calibration runner (not a timed test): prints side by side

* Wanda's prune wall time against one plain forward pass over the same calibration data (the floor is
  2x: statistics, then the pruned block's outputs; target <= 2.5x), and SparseGPT's time;
* the peak memory of calibrating (Wanda, whole runner) a 2-block and an 8-block model of the same width
  (target: flat). On CPU the peak counts every tensor the runner creates until it is freed (the cost
  model's ``LiveBytes`` dispatch tracking), on top of the resident weights; on CUDA it is the allocator's
  peak with the model kept on the CPU and one block at a time on the GPU.

    python scripts/bench_llm_prune.py                         # Llama hidden 256, FFN 688, 32 x 256 tokens
    python scripts/bench_llm_prune.py --hidden 512 --nsamples 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inferno.cost import LiveBytes
from inferno.models.hf import tiny_causal_lm
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import calibration_chunks, prune_model


def make_model(a, layers: int):
    return tiny_causal_lm("llama", seed=0, vocab_size=a.vocab, hidden=a.hidden, layers=layers, heads=a.heads,
                          intermediate=a.ffn, max_positions=max(512, a.seqlen))


@torch.no_grad()
def plain_forward(model, calib, device, batch_size, head: bool = True):
    """One inference pass over the calibration chunks: the whole model, or (``head=False``) the embedding and
    decoder blocks only -- the part the runner runs, so its floor of 2x is measured against this one."""
    model.to(device)
    net = model if head else model.base_model
    for ids in calibration_chunks(calib, batch_size):
        net(input_ids=ids.to(device), use_cache=False)
    model.to("cpu")


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def prune_peak_mb(model, calib, device, batch_size) -> tuple[float, float]:
    """(resident weights MB, peak MB of everything the calibration creates on top of them)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    method = get_method("wanda", sparsity=0.5)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        prune_model(model, method, calib, device=device, batch_size=batch_size, progress=False)
        return weights, (torch.cuda.max_memory_allocated() - base) / 2**20
    resident = list(model.parameters()) + list(model.buffers()) + [calib]
    tracker = LiveBytes(resident)
    with tracker:
        prune_model(model, method, calib, device=device, batch_size=batch_size, progress=False)
    return weights, tracker.peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4, help="blocks of the timed model")
    p.add_argument("--memory-layers", type=int, nargs=2, default=(2, 8))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    calib = torch.randint(0, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    model = make_model(a, a.layers)
    print(f"Llama hidden {a.hidden}, FFN {a.ffn}, {a.layers} blocks, {sum(q.numel() for q in model.parameters()):,} "
          f"parameters; calibration {a.nsamples} x {a.seqlen} tokens in chunks of {a.batch_size}; device {a.device}; "
          f"{torch.get_num_threads()} threads; best of {a.repeats}")

    full, full_med = best_time(lambda: plain_forward(model, calib, a.device, a.batch_size), a.repeats)
    fwd, fwd_med = best_time(lambda: plain_forward(model, calib, a.device, a.batch_size, head=False), a.repeats)
    results = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        results[name] = best_time(
            lambda n=name: prune_model(copy.deepcopy(model), get_method(n, sparsity=0.5), calib, device=a.device,
                                       batch_size=a.batch_size, progress=False),
            a.repeats,
        )
    print()
    print(f"{'what':<34}{'best s':>10}{'median s':>10}{'x forward':>11}")
    print(f"{'plain forward, blocks (no LM head)':<34}{fwd:>10.3f}{fwd_med:>10.3f}{1.0:>11.2f}")
    print(f"{'plain forward, whole model':<34}{full:>10.3f}{full_med:>10.3f}{full / fwd:>11.2f}")
    for name, (best, med) in results.items():
        label = {"magnitude": "magnitude prune (no data)", "wanda": "Wanda prune (sequential runner)",
                 "sparsegpt": "SparseGPT prune (sequential)"}[name]
        print(f"{label:<34}{best:>10.3f}{med:>10.3f}{best / fwd:>11.2f}")
    print(f"  Wanda / blocks forward = {results['wanda'][0] / fwd:.2f}x (floor 2x, target <= 2.5x); "
          f"Wanda / whole-model forward = {results['wanda'][0] / full:.2f}x; "
          f"SparseGPT / Wanda = {results['sparsegpt'][0] / results['wanda'][0]:.2f}x")

    print()
    print(f"{'peak memory of calibrating (Wanda)':<38}{'blocks':>7}{'weights MB':>12}{'calib peak MB':>15}")
    peaks = {}
    for layers in a.memory_layers:
        w, peak = prune_peak_mb(make_model(a, layers), calib, a.device, a.batch_size)
        peaks[layers] = peak
        print(f"{'':<38}{layers:>7}{w:>12.1f}{peak:>15.1f}")
    lo, hi = a.memory_layers
    print(f"  calibration peak {hi} blocks / {lo} blocks = {peaks[hi] / peaks[lo]:.2f}x (target: flat, 1.0x); "
          f"the weights themselves grow {hi / lo:.0f}x")


if __name__ == "__main__":
    main()
