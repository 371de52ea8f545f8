"""Encoder throughput side by side: every (mux N, structured sparsity s) MiniLM architecture timed in ONE process,
interleaved round by round, so the figures and ratios compare on the same machine state (runs' own ``throughput``
columns come from separate processes).

Timing depends on the shapes only: each model is the pretrained MiniLM with the uniform encoder_structured shapes
(round(s * 12) heads and round(s * 1536) neurons removed per layer; which units go does not change the time).
Throughput = sentences/s of inference on ``--batch`` sentences of ``--seq-len`` tokens (every position attended,
the cost model's fixed length); a multiplexed model runs batch / N encoder passes for them.

    python scripts/bench_encoder.py --mux 1 2 4 8 --sparsity 0 0.3 0.5 0.6 --out results/prumux/throughput.csv
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time

import torch


def build(n: int, s: float):
    from inferno.models.encoder import EncoderClassifier
    from inferno.pruning.llm import surgery

    net = EncoderClassifier(num_classes=2, mux_n=n).eval()
    if s > 0:
        decisions = {}
        for i, block in enumerate(net.bert.encoder.layer):
            u = surgery.block_units(block, net.config)
            k = min(round(s * u["kv_heads"]), u["kv_heads"] - 1)
            decisions[i] = surgery.BlockDecision(heads=list(range(k)), neurons=list(range(round(s * u["neurons"]))))
        surgery.apply(net, decisions, "remove")
    return net


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mux", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.6])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each times every model once; median)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="a CSV of the figures")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(args.batch, 3, args.seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(1000, 30000, (args.batch, args.seq_len), generator=g)
    x[:, 1] = 1
    models = {(n, s): build(n, s) for n in args.mux for s in args.sparsity}
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(x)
        for _ in range(args.rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    base = args.batch / statistics.median(times[(1, 0.0)]) if (1, 0.0) in times else None
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, batch {args.batch} x {args.seq_len} tokens, median of {args.rounds} interleaved rounds")
    rows = []
    for (n, s), ts in times.items():
        tput = args.batch / statistics.median(ts)
        params = sum(p.numel() for p in models[(n, s)].parameters())
        rows.append({"mux_n": n, "sparsity": s, "params": params, "throughput": round(tput, 1),
                     "speedup": round(tput / base, 2) if base else ""})
        print(f"N={n} s={s:.1f}: {tput:8.1f} sentences/s" + (f"  {tput / base:5.2f}x dense" if base else ""))
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
