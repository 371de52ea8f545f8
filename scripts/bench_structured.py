"""Dense vs structurally pruned, measured side by side in ONE run: prefill latency, decode tokens/s, weight and peak
memory, and the ratios -- on the bench LM and on a larger random Llama where matmuls dominate.

    python scripts/bench_structured.py                          # CPU, wanda_sp at 50 %
    python scripts/bench_structured.py --device cuda --dtype bfloat16 --out bench.json
    python scripts/bench_structured.py --method nirvana --sparsity 0.5 --threads 2

The pruned model is the same method's decisions applied two ways: physically removed (the structured model) and as
masks (same shapes, zeros): masks alone give no speedup. Measurements alternate between the models in interleaved
rounds (median per model), so drift hits all alike. Targets (issue 11), on the larger model at 50 %: prefill >= 1.8x
faster and >= 45 % less weight memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from inferno.cost import decode_tokens_per_s, measure_latency_ms, peak_memory_mb, weight_memory_mb
from inferno.models.hf import load_causal_lm
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import prune_model

BENCH_LM = Path(os.environ.get("INFERNO_BENCH_LM", Path.home() / ".cache/inferno/bench_lm"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def large_llama(vocab: int = 4096) -> torch.nn.Module:
    """A random Llama where the block matmuls dominate: hidden 1024, 8 blocks, 16 heads / 8 KV heads, FFN 2816."""
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor / machine."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


TEXT = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"


def calibration(name: str, model, nsamples: int, seqlen: int, text: Path = TEXT) -> torch.Tensor:
    """Tiny Shakespeare windows for the bench LM (its own text), random tokens for the random model."""
    g = torch.Generator().manual_seed(0)
    if name == "bench_lm" and text.is_file():
        from transformers import AutoTokenizer

        ids = torch.tensor(AutoTokenizer.from_pretrained(BENCH_LM).encode(text.read_text()[:400_000]))
        starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
        return torch.stack([ids[s : s + seqlen] for s in starts])
    return torch.randint(3, model.config.vocab_size, (nsamples, seqlen), generator=g)


def prune(dense, method: str, sparsity: float, calib, apply: str):
    net = copy.deepcopy(dense)
    prune_model(net, get_method(method, sparsity=sparsity, apply=apply), calib, progress=False)
    return net.eval()


def bench(name: str, dense, args, device, dtype) -> dict:
    calib = calibration(name, dense, args.nsamples, args.calib_seqlen, Path(args.text))
    t0 = time.time()
    models = {"dense": dense, "structured": prune(dense, args.method, args.sparsity, calib, "remove"),
              "masked": prune(dense, args.method, args.sparsity, calib, "mask")}
    prune_s = time.time() - t0
    models = {k: m.to(device=device, dtype=dtype) for k, m in models.items()}
    seqlen = args.seqlen or (128 if name == "bench_lm" else 512)
    ids = torch.randint(3, dense.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    prefill, decode = {k: [] for k in models}, {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            prefill[k].append(measure_latency_ms(m, {"input_ids": ids}, warmup=2, repeats=args.repeats))
            decode[k].append(decode_tokens_per_s(m, ids[:, : args.decode_prompt], new_tokens=args.decode, warmup=1, repeats=1))
    rows = {}
    for k, m in models.items():
        rows[k] = {"params": sum(p.numel() for p in m.parameters()), "weight_mb": weight_memory_mb(m),
                   "prefill_ms": statistics.median(prefill[k]), "decode_tok_s": statistics.median(decode[k]),
                   "peak_mem_mb": peak_memory_mb(m, {"input_ids": ids})}
    d, s = rows["dense"], rows["structured"]
    ratios = {"prefill_speedup": d["prefill_ms"] / s["prefill_ms"],
              "masked_prefill_speedup": d["prefill_ms"] / rows["masked"]["prefill_ms"],
              "decode_speedup": s["decode_tok_s"] / d["decode_tok_s"],
              "weight_memory_saving": 1 - s["weight_mb"] / d["weight_mb"],
              "peak_memory_saving": 1 - s["peak_mem_mb"] / d["peak_mem_mb"],
              "param_saving": 1 - s["params"] / d["params"]}
    print(f"\n== {name}: {args.method} at {args.sparsity:.0%} of attention + MLP parameters, prefill {seqlen} tokens, "
          f"decode {args.decode} tokens after {min(args.decode_prompt, seqlen)}, {args.rounds} interleaved rounds (prune {prune_s:.1f} s)")
    print(f"{'model':>11} {'params':>12} {'weights MB':>11} {'prefill ms':>11} {'decode tok/s':>13} {'peak MB':>9}")
    for k, r in rows.items():
        print(f"{k:>11} {r['params']:>12,d} {r['weight_mb']:>11.1f} {r['prefill_ms']:>11.2f} {r['decode_tok_s']:>13.1f} "
              f"{r['peak_mem_mb']:>9.1f}")
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return {"seqlen": seqlen, "decode_prompt": min(args.decode_prompt, seqlen), "prune_s": prune_s, "models": rows, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--method", default="wanda_sp", help="a structured pruner: nirvana, flap, wanda_sp, llm_pruner, shortgpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seqlen", type=int, default=None, help="prefill tokens (default 128 bench LM, 512 large)")
    p.add_argument("--decode", type=int, default=64, help="new tokens of greedy decoding")
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before decoding (the first of the prefill ids)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="*", default=["bench_lm", "large"], choices=["bench_lm", "large"])
    p.add_argument("--text", default=str(TEXT), help="Tiny Shakespeare, the bench LM's calibration text")
    p.add_argument("--out", default=None, help="write every figure to this JSON file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bfloat16" if a.device == "cuda" else "float32")]
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": a.device,
           "device_name": torch.cuda.get_device_name() if a.device == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(), "dtype": str(dtype), "method": a.method, "sparsity": a.sparsity, "results": {}}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {out['device_name']}, "
          f"{out['threads']} threads, {dtype}")
    for name in a.models:
        if name == "bench_lm" and not (BENCH_LM / "config.json").is_file():
            print(f"\n== bench_lm: skipped ({BENCH_LM} absent; python scripts/train_bench_lm.py)")
            continue
        dense = load_causal_lm(BENCH_LM) if name == "bench_lm" else large_llama()
        out["results"][name] = bench(name, dense, a, device, dtype)
    if "large" in out["results"]:
        r = out["results"]["large"]["ratios"]
        ok = {"prefill >= 1.8x": r["prefill_speedup"] >= 1.8, "weight memory -45 %": r["weight_memory_saving"] >= 0.45}
        out["targets"] = ok
        print("\ntargets on the large model: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in ok.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
        print("wrote", a.out)


if __name__ == "__main__":
    main()
