"""DNNShifter's portfolio, measured side by side in ONE run: switching to a variant in memory vs loading it from disk
(safetensors) vs re-pruning it from its sparse model, the portfolio's weight memory vs keeping the sparse models,
and inference latency of each sparse model vs its smaller (physically pruned) variant.

    python scripts/bench_dnnshifter.py                                # ResNet-20 (width 16), 8 levels, CPU
    python scripts/bench_dnnshifter.py --model microcnn --levels 12 --threads 2 --out bench.json
    python scripts/bench_dnnshifter.py --portfolio outputs/<run>/portfolio   # a real run's variants: switch vs reload

The sparse models here are SYNTHETIC (no training, so the bench runs in a minute): level k keeps 0.8^k of the
weights by global magnitude on |w| times a per-filter log-normal scale, which makes low-scale filters die whole at
high sparsity as trained IMP does. Shapes, not values, set the costs measured; the accuracy side is the pruner's
run (results/dnnshifter). Measurements alternate between the three switch paths in interleaved rounds (median
each), so drift hits all alike. The ordinal claim (issue 14): in-memory switch < reload < re-prune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from inferno.cost import measure_latency_ms, weight_memory_mb
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.dnnshifter import Portfolio, load_variant, save_variant, shrink
from inferno.pruning.cnn.masks import prunable_layers


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build(model: str, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    net = ResNet20(3, 16, in_channels=in_channels) if model == "resnet20" else MicroCNN(in_channels=in_channels)
    g = torch.Generator().manual_seed(0)
    for m in net.modules():  # trained-looking BatchNorm statistics (not the identity of a fresh one)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.rand(m.num_features, generator=g) - 0.5
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def synthetic_sparse(dense: nn.Module, level: int, rate: float = 0.2) -> nn.Module:
    """Level ``level``'s sparse model: global magnitude on |w| x a per-filter log-normal scale (head kept)."""
    import copy

    net = copy.deepcopy(dense)
    layers = prunable_layers(net, include_head=False)
    g = torch.Generator().manual_seed(1)
    scores = {}
    for n, m in layers.items():
        scale = torch.exp(torch.randn(m.weight.shape[0], generator=g) * 1.5)
        scores[n] = m.weight.detach().abs() * scale.view(-1, *[1] * (m.weight.dim() - 1))
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = round(flat.numel() * (1 - rate) ** level)
    threshold = torch.topk(flat, keep).values[-1]
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.mul_((scores[n] >= threshold).to(m.weight.dtype))
    return net.eval()


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["resnet20", "microcnn"], default="resnet20")
    ap.add_argument("--levels", type=int, default=8, help="synthetic levels 1..N, density 0.8^k")
    ap.add_argument("--step", type=int, default=2, help="keep every STEP-th level (the portfolio's variants)")
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--image", type=int, default=28, help="input side (MNIST 28)")
    ap.add_argument("--batch", type=int, default=32, help="inference batch of the latency comparison")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds of switch / reload / re-prune")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--portfolio", help="a dnnshifter run's portfolio/ folder: time switch vs reload of its variants")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    example = torch.randn(1, args.in_channels, args.image, args.image)
    batch = torch.randn(args.batch, args.in_channels, args.image, args.image)
    probe = torch.randn(8, args.in_channels, args.image, args.image)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dnnshifter_"))
    portfolio, paths, sparse = Portfolio(), {}, {}
    if args.portfolio:
        for p in sorted(Path(args.portfolio).glob("level_*.safetensors")):
            level = int(p.stem.split("_")[1])
            paths[level] = p.with_suffix("")
            portfolio.add(level, load_variant(paths[level]))
        if not paths:
            sys.exit(f"--portfolio: no level_*.safetensors in {args.portfolio}")
    else:
        dense = build(args.model, args.in_channels)
        for level in range(args.step, args.levels + 1, args.step):
            sparse[level] = synthetic_sparse(dense, level)
            smaller, _ = shrink(sparse[level], example, probe)
            with torch.no_grad():
                diff = float((smaller(probe) - sparse[level](probe)).abs().max())
            assert diff < 1e-4, f"level {level}: smaller != sparse ({diff:.2e})"
            portfolio.add(level, smaller)
            paths[level] = save_variant(smaller, tmp / f"level_{level:02d}")
    times = {k: {lv: [] for lv in portfolio.levels} for k in ("switch", "reload", "reprune")}
    for _ in range(args.rounds):
        for level in portfolio.levels:
            times["switch"][level].append(timed_ms(lambda lv=level: portfolio.switch(lv)))
            times["reload"][level].append(timed_ms(lambda lv=level: load_variant(paths[lv])))
            if level in sparse:
                times["reprune"][level].append(timed_ms(lambda lv=level: shrink(sparse[lv], example, probe)))
    rows = []
    for level in portfolio.levels:
        v = portfolio.variants[level]
        row = {"level": level, "params_smaller": sum(p.numel() for p in v.parameters()),
               **{f"{k}_ms": statistics.median(t[level]) for k, t in times.items() if t[level]}}
        if level in sparse:
            s = sparse[level]
            nz = sum(int(torch.count_nonzero(p)) for p in s.parameters())
            lat_s, lat_v = [], []
            for _ in range(3):  # interleaved
                lat_s.append(measure_latency_ms(s, batch, warmup=2, repeats=5))
                lat_v.append(measure_latency_ms(v, batch, warmup=2, repeats=5))
            row.update(params_sparse=sum(p.numel() for p in s.parameters()), nonzero_sparse=nz,
                       density=round(0.8 ** level, 4), latency_sparse_ms=statistics.median(lat_s),
                       latency_smaller_ms=statistics.median(lat_v))
            row["smaller_x"] = round(row["params_sparse"] / row["params_smaller"], 3)
            row["speedup"] = round(row["latency_sparse_ms"] / row["latency_smaller_ms"], 3)
        rows.append(row)
    med = {k: statistics.median([x for t in times[k].values() for x in t]) for k in times if any(times[k].values())}
    summary = {"cpu": cpu_name(), "threads": args.threads, "model": "portfolio " + str(args.portfolio) if args.portfolio
               else args.model, "variants": len(rows), "median_ms": med,
               "reload_over_switch": med["reload"] / max(med["switch"], 1e-9),
               "portfolio_mb": portfolio.memory_mb()}
    if "reprune" in med:
        summary["reprune_over_switch"] = med["reprune"] / max(med["switch"], 1e-9)
        summary["reprune_over_reload"] = med["reprune"] / med["reload"]
    if sparse:
        summary["sparse_models_mb"] = sum(weight_memory_mb(s) for s in sparse.values())
        summary["memory_ratio"] = summary["sparse_models_mb"] / summary["portfolio_mb"]
    print(f"{'level':>5} {'density':>8} {'params sparse':>13} {'smaller':>8} {'x':>6} {'lat sparse':>10} {'smaller':>8} "
          f"{'speedup':>7} {'switch ms':>10} {'reload ms':>9} {'reprune ms':>10}")
    def cell(r: dict, key: str, width: int, fmt: str) -> str:
        """A table cell; ``-`` where the figure was not measured (a real portfolio has no sparse models here)."""
        return f"{r[key]:>{width}{fmt}}" if key in r else f"{'-':>{width}}"

    for r in rows:
        print(" ".join([cell(r, "level", 5, ""), cell(r, "density", 8, ".4f"), cell(r, "params_sparse", 13, ""),
                        cell(r, "params_smaller", 8, ""), cell(r, "smaller_x", 6, ".2f"),
                        cell(r, "latency_sparse_ms", 10, ".3f"), cell(r, "latency_smaller_ms", 8, ".3f"),
                        cell(r, "speedup", 7, ".2f"), cell(r, "switch_ms", 10, ".5f"), cell(r, "reload_ms", 9, ".3f"),
                        cell(r, "reprune_ms", 10, ".2f")]))
    print(json.dumps(summary, indent=1))
    ordinal = med["switch"] < med["reload"] and ("reprune" not in med or med["reload"] < med["reprune"])
    print("ordinal switch < reload" + (" < re-prune" if "reprune" in med else "") + ":", "yes" if ordinal else "NO")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
