"""Benchmark of the sequential calibration runner (not a timed test): prints side by side

1. in one process, best of ``--repeats``: a plain forward of the decoder blocks over the calibration data, the
   **two-pass floor** (the runner's own loop with no statistics and no method: per block one forward to collect,
   one to propagate -- what any sequential method must at least do), and magnitude / Wanda / SparseGPT pruning,
   each as a ratio to the floor;
2. with ``--peer-python`` (the python of a throwaway venv holding llm-compressor, see
   ``scripts/peer_llmcompressor.py``; never a project dependency): Wanda and SparseGPT at 50 % by the project and
   by llm-compressor, each run in a fresh process on the same saved model and the same calibration ids; the wall
   time of the pruning call alone and the process's peak resident memory (above the loaded model, and in all),
   with the project / peer ratios;
3. the peak memory of calibrating (Wanda, whole runner) a 2-block and an 8-block model of the same width
   (target: flat): on CPU every tensor the runner creates until it is freed (``cost.LiveBytes``), on CUDA the
   allocator's peak with the model on the CPU and one block at a time on the GPU.

    python scripts/bench_llm_prune.py                                    # the bench LM's shape (4 M parameters)
    python scripts/bench_llm_prune.py --preset 110m --threads 2 --peer-python /work/peer/venv/bin/python
    python scripts/bench_llm_prune.py --hidden 512 --nsamples 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from inferno.cost import LiveBytes
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import calibration_chunks, capture_inputs, get_blocks, prune_model, run_layers

PRESETS = {  # hidden, ffn, layers, heads, vocab
    "bench": {"hidden": 256, "ffn": 688, "layers": 4, "heads": 4, "vocab": 4096},
    "110m": {"hidden": 1024, "ffn": 2752, "layers": 8, "heads": 16, "vocab": 4096},  # 110.4 M parameters
}


def make_model(a, layers: int):
    """A random Llama (multi-head attention: as many KV heads as heads), float32, seeded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, vocab_size=a.vocab, max_position_embeddings=max(512, a.seqlen),
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def plain_forward(model, calib, device, batch_size):
    """One inference pass of the embedding and decoder blocks over the calibration chunks."""
    model.to(device)
    for ids in calibration_chunks(calib, batch_size):
        model.base_model(input_ids=ids.to(device), use_cache=False)
    model.to("cpu")


@torch.no_grad()
def two_pass_floor(model, calib, device, batch_size):
    """Capture the first block's inputs, then per block one forward to collect and one to propagate: the runner's
    loop with no statistics and a method that changes nothing but asks for the outputs to be recomputed."""
    state = capture_inputs(model, calib, device, batch_size)
    run_layers(model, state, range(len(get_blocks(model))), lambda block: True, None, device, progress=False)


def timed(fn, repeats: int) -> tuple[float, float]:
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


# ----------------------------------------------------------------------------------- one process per run
def worker(a) -> None:
    """``--worker``: prune the saved model once with the project's runner and write the figures the peer's script
    writes, measured the same way (wall time of the pruning call alone; the resident size once the model is in
    ordinary memory, then the peak resident size from there)."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from peer_llmcompressor import materialize, maxrss_mb, reset_peak_rss, rss_mb  # the peer's own measurement

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    materialize(model)  # weights in ordinary memory, not a lazily paged file mapping
    ids = torch.load(a.calib, weights_only=True)
    method = get_method(a.method, sparsity=0.5)
    if not reset_peak_rss():  # the peak from here on belongs to pruning, not to loading
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs)")
    loaded = rss_mb()
    t0 = time.perf_counter()
    prune_model(model, method, ids, device="cpu", batch_size=a.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    zeros = sum(int((m.weight == 0).sum()) for b in get_blocks(model) for m in b.modules() if isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for b in get_blocks(model) for m in b.modules() if isinstance(m, torch.nn.Linear))
    Path(a.out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": maxrss_mb(), "rss_loaded_mb": loaded,
                                       "decoder_linear_sparsity": zeros / total, "threads": torch.get_num_threads()}))


def side_by_side(a, model, calib) -> None:
    """Project vs llm-compressor, each run in a fresh process, alternating, ``--peer-repeats`` times each."""
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        torch.save(calib, Path(tmp) / "calib.pt")
        common = ["--model", str(Path(tmp) / "model"), "--calib", str(Path(tmp) / "calib.pt")]
        rows = {}
        for method in ("wanda", "sparsegpt"):
            runs = {"project": [], "peer": []}
            for r in range(a.peer_repeats):
                for who in ("project", "peer"):
                    out = Path(tmp) / f"{who}_{method}_{r}.json"
                    if who == "project":
                        cmd = [sys.executable, __file__, "--worker", "--method", method, "--threads", str(a.threads),
                               "--batch-size", str(a.batch_size), "--out", str(out), *common]
                    else:
                        cmd = [a.peer_python, str(ROOT / "scripts" / "peer_llmcompressor.py"), "--method", method,
                               "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--threads", str(a.threads),
                               "--batch-size", str(a.peer_batch_size), "--out", str(out), *common]
                    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    res = json.loads(out.read_text())
                    res["seconds"] = res.get("seconds", res.get("oneshot_s"))
                    runs[who].append(res)
                    print(f"  {method:<10}{who:<8} run {r + 1}: {res['seconds']:8.2f} s, peak RSS {res['peak_rss_mb']:8.1f} MB, "
                          f"zeros {res['decoder_linear_sparsity']:.4f}", flush=True)
            rows[method] = runs
    print()
    print(f"{'method':<11}{'who':<9}{'best s':>9}{'median s':>10}{'peak RSS MB':>13}{'above loaded':>14}")
    for method, runs in rows.items():
        for who, res in runs.items():
            best = min(r["seconds"] for r in res)
            med = statistics.median(r["seconds"] for r in res)
            peak = min(r["peak_rss_mb"] for r in res)
            above = min(r["peak_rss_mb"] - r["rss_loaded_mb"] for r in res)
            print(f"{method:<11}{who:<9}{best:>9.2f}{med:>10.2f}{peak:>13.1f}{above:>14.1f}")
        p, q = runs["project"], runs["peer"]
        print(f"  {method}: project / llm-compressor time = {min(r['seconds'] for r in p) / min(r['seconds'] for r in q):.2f}x "
              f"(best), {statistics.median(r['seconds'] for r in p) / statistics.median(r['seconds'] for r in q):.2f}x "
              f"(median); peak RSS = {min(r['peak_rss_mb'] for r in p) / min(r['peak_rss_mb'] for r in q):.2f}x, "
              f"peak above the loaded model = {min(r['peak_rss_mb'] - r['rss_loaded_mb'] for r in p) / min(r['peak_rss_mb'] - r['rss_loaded_mb'] for r in q):.2f}x")
    print(f"  (project calibration chunks of {a.batch_size}, llm-compressor batch size {a.peer_batch_size}, its default)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    for key in ("hidden", "ffn", "heads", "vocab", "layers"):
        p.add_argument(f"--{key}", type=int, default=None, help="overrides the preset")
    p.add_argument("--memory-layers", type=int, nargs=2, default=(2, 8))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=("inprocess", "memory"), help="sections to leave out")
    p.add_argument("--peer-python", default=None, help="python of a venv with llmcompressor 0.14 (side-by-side runs)")
    p.add_argument("--peer-repeats", type=int, default=2)
    p.add_argument("--peer-batch-size", type=int, default=1)
    # one pruning run in this process (used by the side-by-side section)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calib", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.worker:
        return worker(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.threads = torch.get_num_threads()
    calib = torch.randint(0, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    model = make_model(a, a.layers)
    print(f"Llama hidden {a.hidden}, FFN {a.ffn}, {a.layers} blocks, {a.heads} heads, vocab {a.vocab}: "
          f"{sum(q.numel() for q in model.parameters()):,} parameters; calibration {a.nsamples} x {a.seqlen} tokens in "
          f"chunks of {a.batch_size}; device {a.device}; {a.threads} threads; load average {os.getloadavg()[0]:.2f}")

    if "inprocess" not in a.skip:
        fwd = timed(lambda: plain_forward(model, calib, a.device, a.batch_size), a.repeats)
        floor = timed(lambda: two_pass_floor(model, calib, a.device, a.batch_size), a.repeats)
        results = {}
        for name in ("magnitude", "wanda", "sparsegpt"):
            results[name] = timed(
                lambda n=name: prune_model(copy.deepcopy(model), get_method(n, sparsity=0.5), calib, device=a.device,
                                           batch_size=a.batch_size, progress=False),
                a.repeats,
            )
        print(f"\nin one process, best of {a.repeats}")
        print(f"{'what':<40}{'best s':>10}{'median s':>10}{'x floor':>9}")
        rows = [("plain forward, blocks (no LM head)", fwd), ("two-pass floor (collect + propagate)", floor),
                ("magnitude prune (no data)", results["magnitude"]), ("Wanda prune (sequential runner)", results["wanda"]),
                ("SparseGPT prune (sequential runner)", results["sparsegpt"])]
        for label, (best, med) in rows:
            print(f"{label:<40}{best:>10.3f}{med:>10.3f}{best / floor[0]:>9.2f}")
        print(f"  Wanda / two-pass floor = {results['wanda'][0] / floor[0]:.2f}x; SparseGPT / two-pass floor = "
              f"{results['sparsegpt'][0] / floor[0]:.2f}x; floor / one forward = {floor[0] / fwd[0]:.2f}x")

    if a.peer_python:
        print("\nside by side with llm-compressor (fresh process per run)")
        side_by_side(a, model, calib)

    if "memory" not in a.skip:
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
