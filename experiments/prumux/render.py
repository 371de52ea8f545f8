"""Render the PruMUX grid from every ``points.csv`` under a multirun folder (``python -m inferno -m experiment=prumux``).

    python experiments/prumux/render.py outputs/multiruns/DATE --out results/prumux [--bench results/prumux/throughput.csv]

Writes ``grid.md`` (accuracy, throughput measured in each run and, with ``--bench``, the side-by-side benchmark's
throughput and speedup, for every N x sparsity), ``frontier.md`` and ``frontier.png`` (the throughput-accuracy
Pareto frontier), ``autoprumux.md`` (the Auto-PruMUX predictor's leave-out validation and picks at several
accuracy-loss budgets, ``inferno.pick``), ``points_all.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def load(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("points.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                r["source"] = str(f.parent)
                r["s"] = 0.0 if r["method"] == "dense" else float(r["target_sparsity"])
                r["N"] = int(r["mux_n"])
                rows.append(r)
    return rows


def bench_table(path: Path | None) -> dict:
    if not path:
        return {}
    with open(path, newline="") as f:
        return {(int(r["mux_n"]), round(float(r["sparsity"]), 2)): r for r in csv.DictReader(f)}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (throughput, accuracy, label) not dominated (higher throughput and higher accuracy are better)."""
    front, best = [], -1.0
    for t, a, lab in sorted(points, key=lambda p: (-p[0], -p[1])):
        if a > best:
            front.append((t, a, lab))
            best = a
    return sorted(front)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/prumux"))
    ap.add_argument("--bench", type=Path, default=None, help="scripts/bench_encoder.py's CSV (side-by-side timing)")
    args = ap.parse_args(argv)
    rows = load(args.root)
    if not rows:
        raise SystemExit(f"error: no points.csv under {args.root}")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = bench_table(args.bench)
    cols = ["N", "s", "method", "value", "sparsity", "params", "macs", "throughput", "train_samples", "wall_s", "source"]
    with open(args.out / "points_all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    dense = next(r for r in rows if r["N"] == 1 and r["method"] == "dense")
    acc0, tput0 = float(dense["value"]), float(dense["throughput"])
    b0 = float(bench[(1, 0.0)]["throughput"]) if (1, 0.0) in bench else None
    lines = ["# PruMUX grid: MiniLM on SST-2 dev (872 sentences)\n",
             f"Dense MiniLM (N=1, s=0): accuracy {acc0:.4f}, throughput {tput0:.1f} sentences/s (in its run).\n",
             "| N | target s | achieved s | accuracy | Δ vs dense | MACs/sentence (M) | throughput (run) | speedup (run) "
             + ("| throughput (bench) | speedup (bench) " if bench else "") + "|",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if bench else "")]
    for r in sorted(rows, key=lambda r: (r["N"], r["s"])):
        t = float(r["throughput"])
        line = (f"| {r['N']} | {r['s']:.1f} | {float(r['sparsity']):.3f} | {float(r['value']):.4f} | "
                f"{float(r['value']) - acc0:+.4f} | {int(r['macs']) / 1e6:.1f} | {t:.1f} | {t / tput0:.2f}x |")
        bk = bench.get((r["N"], round(r["s"], 2)))
        if bench:
            line += f" {float(bk['throughput']):.1f} | {float(bk['throughput']) / b0:.2f}x |" if bk else " - | - |"
        lines.append(line)
    (args.out / "grid.md").write_text("\n".join(lines) + "\n")
    speed = {(r["N"], round(r["s"], 2)): (float(bench[(r["N"], round(r["s"], 2))]["throughput"]) / b0 if bench
                                          else float(r["throughput"]) / tput0) for r in rows}
    pts = [(speed[(r["N"], round(r["s"], 2))], float(r["value"]), f"N={r['N']} s={r['s']:.1f}") for r in rows]
    front = pareto(pts)
    fl = ["# Throughput-accuracy frontier (speedup over the dense MiniLM" + (", side-by-side benchmark" if bench else
          ", in-run timing") + ")\n", "| config | speedup | accuracy |", "|---|---|---|"]
    fl += [f"| {lab} | {t:.2f}x | {a:.4f} |" for t, a, lab in front]
    (args.out / "frontier.md").write_text("\n".join(fl) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n, marker in zip((1, 2, 4, 8), "osD^"):
        mine = sorted((p for p, r in zip(pts, rows) if r["N"] == n), key=lambda p: p[0])
        if mine:
            ax.plot([p[0] for p in mine], [p[1] for p in mine], marker=marker, ls=":", label=f"N={n}")
            for t, a, lab in mine:
                ax.annotate(lab.split()[1], (t, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([p[0] for p in front], [p[1] for p in front], color="0.2", lw=1.5, label="Pareto frontier")
    ax.axhline(acc0 - 0.05, color="r", lw=0.8, ls="--", label="dense - 5 points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("throughput speedup over dense MiniLM (sentences/s ratio, log2)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("PruMUX on CPU: multiplexing N x structured sparsity s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "frontier.png", dpi=120)
    plt.close(fig)
    autoprumux(rows, bench, b0, acc0, args.out)
    print((args.out / "grid.md").read_text())
    return 0


def autoprumux(rows, bench, b0, acc0, out: Path) -> None:
    """Leave-out validation of the Auto-PruMUX predictor (inferno.pick) on the grid, and its picks."""
    from inferno import pick

    pts = []
    for r in rows:
        bk = bench.get((r["N"], round(r["s"], 2)))
        pts.append({"sparsity": r["s"], "mux_n": r["N"], "value": float(r["value"]), "method": r["method"],
                    "throughput": float(bk["throughput"]) if bk else float(r["throughput"])})
    text = pick.prumux_report(pts, dense_accuracy=acc0, budgets=(0.01, 0.02, 0.05, 0.10))
    (out / "autoprumux.md").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
