"""Render the SPLoRA vs fine-pruning comparison from every ``points.csv`` under a multirun folder
(``python -m inferno -m experiment=splora``).

    python experiments/splora/render.py outputs/multiruns/DATE --out results/splora

Writes ``table.md`` (per task and sparsity: accuracy, parameters of the pruned model, trained parameters stored per
task, MACs and throughput, for splora and fine_pruning), ``accuracy.png`` (accuracy against density per task) and
``points_all.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

COLS = ["task", "method", "target_sparsity", "sparsity", "value", "params", "trained_params", "macs", "throughput",
        "train_samples", "rank", "wall_s"]


def load(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("points.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["method"] == "dense":
                    r["method"], r["target_sparsity"] = "fine_pruning", "0.0"  # fine-pruning's dense start
                    r["trained_params"] = r["params"]
                rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/splora"))
    args = ap.parse_args(argv)
    rows = load(args.root)
    if not rows:
        raise SystemExit(f"error: no points.csv under {args.root}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "points_all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["# SPLoRA vs fine-pruning on MiniLM (GLUE dev accuracy)\n"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        lines += [f"\n## {task}\n", ("| sparsity (target / achieved) | method | accuracy | params | trained params per task "
                  "| MACs/sentence (M) | throughput (sent/s) |"), "|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (float(r["target_sparsity"]), r["method"])):
            lines.append(f"| {float(r['target_sparsity']):.1f} / {float(r['sparsity']):.3f} | {r['method']} | "
                         f"{float(r['value']):.4f} | {int(r['params']):,} | {int(float(r['trained_params'])):,} | "
                         f"{int(r['macs']) / 1e6:.1f} | {float(r['throughput']):.1f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, marker in (("splora", "o"), ("fine_pruning", "s")):
            pts = sorted((1 - float(r["target_sparsity"]), float(r["value"])) for r in rows
                         if r["task"] == task and r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
        ax.set_xlabel("density (1 - target sparsity of attention + FFN)")
        ax.set_ylabel(f"{task} dev accuracy")
        ax.set_title(f"MiniLM on {task}")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "accuracy.png", dpi=120)
    plt.close(fig)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
