"""Render the structured_llm table and curves from every ``points.csv`` under a results folder.

    python experiments/structured_llm/render.py outputs/structured_llm --out results/structured_llm
    [--latency outputs/structured_llm/latency.json]   # side-by-side timings (experiments/structured_llm/latency.py)

Writes ``table.md`` (mean ± std over calibration seeds, per sparsity: achieved sparsity, params, prefill latency,
decode tokens/s, WikiText-2 / Shakespeare perplexity, BoolQ / PIQA / ARC-e / ARC-c accuracy), ``ordering.md`` (the
methods ordered by perplexity at each sparsity, next to the literature's LLaMA-7B reference points),
``points_all.csv``, ``quality_vs_latency.png`` and ``quality_vs_params.png``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

_spec = importlib.util.spec_from_file_location("thesis_render", Path(__file__).parents[1] / "thesis_llm" / "render.py")
_thesis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_thesis)
stats, fmt = _thesis.stats, _thesis.fmt  # mean ± std over seeds, the same formatting as thesis_llm

ORDER = ["dense", "nirvana", "nirvana_kl", "flap", "flap_nocomp", "wanda_sp", "llm_pruner", "shortgpt"]
SETTINGS = ["20%", "30%", "50%"]
PPL = ["wikitext2", "shakespeare"]
ZERO_SHOT = ["boolq", "piqa", "arc_easy", "arc_challenge"]
# LLaMA-7B, WikiText-2 perplexity (dense 12.62) at 20 / 30 / 50 %: the ordering to expect (issue 11)
LITERATURE = {"flap": (14.62, 17.62, 31.80), "wanda_sp": (22.12, 38.88, 366.43)}


def label(row: dict) -> str:
    if row["method"] == "nirvana" and row.get("kl") not in (None, ""):
        return "nirvana_kl"
    if row["method"] == "flap" and row.get("variant") == "wifv_nocomp":
        return "flap_nocomp"
    return row["method"]


def load(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("points.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                r["label"] = label(r)
                r["setting"] = "dense" if r["method"] == "dense" else f"{round(float(r['target_sparsity']) * 100)}%"
                rows.append(r)
    return rows


COLUMNS = {"sparsity": "sparsity", "params": "params", "latency_ms": "latency_ms", "decode_tok_s": "decode_tok_s"}


def collect(rows, latency: dict | None = None):
    """(task, setting, label, metric) -> values; cost columns also under task '*'. Dense rows once per task."""
    out, seen = defaultdict(list), set()
    for r in rows:
        if r["label"] == "dense":
            if r["task"] in seen:
                continue
            seen.add(r["task"])
        key = (r["setting"], r["label"])
        out[(r["task"], *key, "value")].append(float(r["value"]))
        for col in COLUMNS:
            if r.get(col) not in (None, ""):
                out[("*", *key, col)].append(float(r[col]))
    if latency:  # side-by-side timings replace the per-cell ones
        for k in [k for k in out if k[0] == "*" and k[3] in ("latency_ms", "decode_tok_s")]:
            del out[k]
        for entry in latency["models"]:
            key = (entry["setting"], entry["label"])
            out[("*", *key, "latency_ms")].append(entry["latency_ms"])
            out[("*", *key, "decode_tok_s")].append(entry["decode_tok_s"])
    return out


def table(rows, data) -> str:
    labels = [x for x in ORDER if any(r["label"] == x for r in rows)]
    tasks = [t for t in PPL + ZERO_SHOT if any(r["task"] == t for r in rows)]
    head = ["method", "sparsity", "params (M)", "prefill ms", "decode tok/s"] + [
        f"{t} ppl ↓" if t in PPL else f"{t} acc" for t in tasks]
    lines = []
    for st in SETTINGS:
        if not any(r["setting"] == st for r in rows):
            continue
        lines += [f"\n### {st} of the attention + MLP parameters\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            s = "dense" if lab == "dense" else st
            params = stats(data.get(("*", s, lab, "params"), []))
            cells = [lab, fmt(stats(data.get(("*", s, lab, "sparsity"), [])), 3),
                     fmt((params[0] / 1e6, params[1] / 1e6, params[2]), 3),
                     fmt(stats(data.get(("*", s, lab, "latency_ms"), [])), 2),
                     fmt(stats(data.get(("*", s, lab, "decode_tok_s"), [])), 0)]
            cells += [fmt(stats(data.get((t, s, lab, "value"), [])), 2 if t in PPL else 3) for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering(rows, data) -> str:
    labels = [x for x in ORDER if x != "dense" and any(r["label"] == x for r in rows)]
    out = []
    for t in PPL:
        for j, st in enumerate(SETTINGS):
            means = {lab: stats(data.get((t, st, lab, "value"), []))[0] for lab in labels}
            means = {k: v for k, v in means.items() if not math.isnan(v)}
            if not means:
                continue
            ranked = sorted(means, key=means.get)
            out.append(f"- {t}, {st}: " + " < ".join(f"{lab} ({means[lab]:.1f})" for lab in ranked))
            if t == "wikitext2" and all(k in means for k in LITERATURE):
                lit = {k: v[j] for k, v in LITERATURE.items()}
                agree = (means["flap"] < means["wanda_sp"]) == (lit["flap"] < lit["wanda_sp"])
                out.append(f"  - literature (LLaMA-7B): flap {lit['flap']} < wanda_sp {lit['wanda_sp']}; "
                           f"measured flap {'<' if means['flap'] < means['wanda_sp'] else '>='} wanda_sp: "
                           f"{'same ordering' if agree else 'ordering differs'}")
    return "\n".join(out)


def curves(rows, data, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [x for x in ORDER if x != "dense" and any(r["label"] == x for r in rows)]
    tasks = [t for t in PPL if any(r["task"] == t for r in rows)]
    zs = [t for t in ZERO_SHOT if any(r["task"] == t for r in rows)]
    panels = tasks + (["zero-shot mean acc"] if zs else [])

    def quality(setting, lab, panel):
        if panel in PPL:
            return stats(data.get((panel, setting, lab, "value"), []))[0]
        accs = [stats(data.get((t, setting, lab, "value"), []))[0] for t in zs]
        accs = [a for a in accs if not math.isnan(a)]
        return statistics.fmean(accs) if accs else float("nan")

    paths = []
    for x_col, xlabel, fname in (("latency_ms", "measured prefill latency (ms)", "quality_vs_latency.png"),
                                 ("params", "parameters (M)", "quality_vs_params.png")):
        scale = 1e6 if x_col == "params" else 1.0
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for lab in labels:
                pts = []
                for st in SETTINGS:
                    x = stats(data.get(("*", st, lab, x_col), []))[0]
                    y = quality(st, lab, panel)
                    if not (math.isnan(x) or math.isnan(y)):
                        pts.append((x / scale, y, st))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=lab,
                            color=f"C{ORDER.index(lab) % 10}")  # one colour per method in every panel
                    for x, y, st in pts:
                        ax.annotate(st, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            dx = stats(data.get(("*", "dense", "dense", x_col), []))[0]
            dy = quality("dense", "dense", panel)
            if not (math.isnan(dx) or math.isnan(dy)):
                ax.plot([dx / scale], [dy], marker="*", ms=12, color="k", ls="", label="dense")
            ax.set_xlabel(xlabel)
            ax.set_title(panel)
            if panel in PPL:
                ax.set_ylabel("perplexity (lower is better)")
                ax.set_yscale("log")
            else:
                ax.set_ylabel("accuracy (higher is better)")
            ax.grid(alpha=0.3)
        handles = {lab: h for ax in axes[0] for h, lab in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle("bench LM, structured pruning: quality against " + xlabel.split(" (")[0])
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = outdir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?", default="outputs/structured_llm")
    p.add_argument("--out", default="results/structured_llm")
    p.add_argument("--latency", help="latency.json of experiments/structured_llm/latency.py (side-by-side timings)")
    a = p.parse_args()
    root, outdir = Path(a.root), Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = load(root)
    if not rows:
        raise SystemExit(f"no points.csv under {root}")
    latency = json.loads(Path(a.latency).read_text()) if a.latency else None
    data = collect(rows, latency)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(outdir / "points_all.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    seeds = sorted({r.get("calib_seed") for r in rows if r["method"] != "dense"}, key=lambda s: int(s or 0))
    timing = ("prefill latency and decode tokens/s measured side by side in one process by "
              "experiments/structured_llm/latency.py" if latency else "latency and decode tokens/s as each cell measured them")
    md = (f"# structured_llm: {len(rows)} points from {root}\n\nmean ± std over calibration seeds (calibration seeds "
          f"used: {', '.join(seeds)}); sparsity = achieved fraction of the attention + MLP parameters removed; "
          f"{timing}.\n" + table(rows, data))
    (outdir / "table.md").write_text(md + "\n")
    order = ordering(rows, data)
    (outdir / "ordering.md").write_text("# Methods ordered by perplexity (mean over seeds)\n\n" + order + "\n")
    figs = curves(rows, data, outdir)
    print(md + "\n\n" + order)
    print("wrote", outdir / "table.md", outdir / "ordering.md", *figs)


if __name__ == "__main__":
    main()
