"""Render the mosaic experiment from every ``points.csv`` under a results folder.

    python experiments/mosaic/render.py outputs/mosaic --out results/mosaic

Writes ``table.md`` (per model and sparsity, mean ± std over calibration seeds: achieved sparsity, params,
effective MACs, prefill latency, production time ``prune_s``, perplexities and zero-shot accuracies),
``production.md`` (model-production time at 50 % against the structured methods), ``ordering.md`` (WikiText-2
ordering at every sparsity, next to the paper's LLaMA-7B figure), ``points_all.csv`` and one ``<model>.png``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
from collections import defaultdict
from pathlib import Path

_spec = importlib.util.spec_from_file_location("thesis_render", Path(__file__).parents[1] / "thesis_llm" / "render.py")
_thesis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_thesis)
stats, fmt = _thesis.stats, _thesis.fmt

ORDER = ["dense", "sparsegpt", "owl", "mosaic", "mosaic_ref", "composite_25", "composite_50", "nirvana", "llm_pruner"]
SETTINGS = ["50%", "70%", "80%"]
PPL = ["wikitext2", "shakespeare"]
ZERO_SHOT = ["boolq", "piqa", "arc_easy", "arc_challenge"]
COST = ["sparsity", "params", "effective_macs", "latency_ms", "peak_mem_mb", "prune_s"]


def label(row: dict) -> str:
    m, v = row["method"], row.get("variant") or ""
    if m == "mosaic":
        return "mosaic_ref" if v.endswith("_reference") else "mosaic"
    if m == "mosaic_composite":
        return f"composite_{round(float(v.rsplit('_f', 1)[1]) * 100)}"
    return m


def load(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("points.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                r["label"] = label(r)
                r["setting"] = "dense" if r["method"] == "dense" else f"{round(float(r['target_sparsity']) * 100)}%"
                rows.append(r)
    return rows


def collect(rows):
    out, seen = defaultdict(list), set()
    for r in rows:
        if r["label"] == "dense":
            if (r["model"], r["task"]) in seen:
                continue
            seen.add((r["model"], r["task"]))
        key = (r["model"], r["setting"], r["label"])
        out[(*key, r["task"])].append(float(r["value"]))
        for col in COST:
            if r.get(col) not in (None, ""):
                out[(*key, col)].append(float(r[col]))
    return out


def table(rows, data) -> str:
    tasks = [t for t in PPL + ZERO_SHOT if any(r["task"] == t for r in rows)]
    head = ["method", "sparsity", "params (M)", "eff. MACs (M)", "prefill ms", "peak MB", "prune_s"] + [
        f"{t} ppl ↓" if t in PPL else f"{t} acc" for t in tasks]
    lines = []
    for model in sorted({r["model"] for r in rows}):
        for st in SETTINGS:
            if not any(r["model"] == model and r["setting"] == st for r in rows):
                continue
            lines += [f"\n### {model}, {st}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for lab in ORDER:
                s = "dense" if lab == "dense" else st
                if not any(k[:3] == (model, s, lab) for k in data):
                    continue
                cells = [lab, fmt(stats(data.get((model, s, lab, "sparsity"), [])), 3)]
                for col, scale in (("params", 1e6), ("effective_macs", 1e6)):
                    mu, sd, n = stats(data.get((model, s, lab, col), []))
                    cells.append(fmt((mu / scale, sd / scale, n), 3 if col == "params" else 1))
                cells += [fmt(stats(data.get((model, s, lab, col), [])), 2) for col in ("latency_ms", "peak_mem_mb", "prune_s")]
                cells += [fmt(stats(data.get((model, s, lab, t), [])), 2 if t in PPL else 3) for t in tasks]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def production(data) -> str:
    out = ["| model | method | prune_s at 50 % (mean of seeds) | ratio to mosaic |", "|---|---|---|---|"]
    for model in sorted({k[0] for k in data}):
        base = stats(data.get((model, "50%", "mosaic", "prune_s"), []))[0]
        for lab in ORDER[1:]:
            mu = stats(data.get((model, "50%", lab, "prune_s"), []))[0]
            if not math.isnan(mu):
                out.append(f"| {model} | {lab} | {mu:.2f} | {mu / base:.2f}× |")
    return "\n".join(out)


def ordering(data) -> str:
    out = []
    for model in sorted({k[0] for k in data}):
        for t in PPL:
            for st in SETTINGS:
                means = {lab: stats(data.get((model, st, lab, t), []))[0] for lab in ORDER[1:]}
                means = {k: v for k, v in means.items() if not math.isnan(v)}
                if means:
                    out.append(f"- {model}, {t}, {st}: " + " < ".join(f"{k} ({means[k]:.1f})" for k in sorted(means, key=means.get)))
    out.append("- paper (LLaMA-7B, WikiText-2, 80 %, read off its figure): mosaic ≈ 27 < owl ≈ 84 < uniform ≈ 172")
    return "\n".join(out)


def plots(rows, data, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in sorted({r["model"] for r in rows}):
        tasks = [t for t in PPL if any(r["task"] == t and r["model"] == model for r in rows)]
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            for lab in ORDER[1:7]:
                xs, ys, es = [], [], []
                for j, st in enumerate(SETTINGS):
                    mu, sd, n = stats(data.get((model, st, lab, t), []))
                    if n:
                        xs.append(j)
                        ys.append(mu)
                        es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, label=lab,
                                color=f"C{ORDER.index(lab) % 10}")
            d = stats(data.get((model, "dense", "dense", t), []))
            if d[2]:
                ax.axhline(d[0], color="k", ls="--", lw=1, label="dense")
            ax.set_xticks(range(len(SETTINGS)), SETTINGS)
            ax.set_xlabel("sparsity of the block linears")
            ax.set_ylabel("perplexity (lower is better)")
            ax.set_yscale("log")
            ax.set_title(t)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(model)
        fig.tight_layout()
        path = outdir / f"{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?", default="outputs/mosaic")
    p.add_argument("--out", default="results/mosaic")
    a = p.parse_args()
    root, outdir = Path(a.root), Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = load(root)
    if not rows:
        raise SystemExit(f"no points.csv under {root}")
    data = collect(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(outdir / "points_all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md = (f"# mosaic: {len(rows)} points from {root}\n\nmean ± std over calibration seeds; sparsity = achieved fraction "
          f"of the block linears' weights removed or zeroed.\n" + table(rows, data))
    (outdir / "table.md").write_text(md + "\n")
    (outdir / "production.md").write_text("# Model-production time\n\n" + production(data) + "\n")
    (outdir / "ordering.md").write_text("# Orderings by perplexity (mean of seeds)\n\n" + ordering(data) + "\n")
    figs = plots(rows, data, outdir)
    print(md + "\n\n" + production(data) + "\n\n" + ordering(data))
    print("wrote", outdir / "table.md", *figs)


if __name__ == "__main__":
    main()
