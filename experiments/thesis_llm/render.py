"""Render the thesis_llm table and plots from every ``points.csv`` under a results folder.

    python experiments/thesis_llm/render.py outputs/thesis_llm --out results/thesis_llm

Writes ``table.md`` (mean ± std over calibration seeds: WikiText-2 perplexity; per commonsense task acc,
acc_norm and task_nll), ``checks.md`` (the issue's expected orderings, with the figures), ``points_all.csv``
and one ``<model>.png`` per model (quality against setting, one line per method); and ``report/``, the project's
cross-run report of the same points (``inferno.report``: mean ± std over seeds per method × configuration, Pareto
plots against MACs, effective MACs, latency and training cost, a self-contained ``index.html``). The tables here
are the experiment's own (its labels and settings, acc / acc_norm / task_nll per task, the expected orderings).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

LABELS = {  # (method, variant, calibration) -> label in the table
    ("magnitude", None, None): "magnitude",
    ("wanda", None, "shakespeare"): "wanda",
    ("wanda", None, "task"): "wanda_task",
    ("sparsegpt", None, "shakespeare"): "sparsegpt",
    ("sparsegpt", None, "task"): "sparsegpt_task",
    ("owl", None, "shakespeare"): "owl",
    ("owl", None, "task"): "owl_task",
    ("inferno_task", "l2", "task"): "inferno_l2",
    ("inferno_task", "skewness", "task"): "inferno_skewness",
    ("inferno_task", "l2", "shakespeare"): "inferno_l2_generic",
    ("inferno_task", "skewness", "shakespeare"): "inferno_skewness_generic",
}
ORDER = ["dense", "magnitude", "wanda", "wanda_task", "sparsegpt", "sparsegpt_task", "owl", "owl_task", "inferno_l2",
         "inferno_skewness", "inferno_skewness_ref", "inferno_thesis", "inferno_l2_generic", "inferno_skewness_generic"]
SETTINGS = ["36%", "50%", "70%", "2:4"]
TASKS = ["wikitext2", "shakespeare", "boolq", "piqa", "arc_easy", "arc_challenge"]
PPL_TASKS = ("wikitext2", "shakespeare")


def label(row: dict) -> str:
    m = row["method"]
    if m == "dense":
        return "dense"
    if m == "magnitude":
        return "magnitude"
    key = (m, row.get("variant") if m == "inferno_task" else None, row.get("calibration"))
    lab = LABELS.get(key, f"{m}_{row.get('variant')}_{row.get('calibration')}")
    if row.get("calibration_unit") == "example" and row.get("sequential") in ("False", "false") \
            and row.get("generate") == "50" and lab == "inferno_skewness":
        return "inferno_thesis"  # experiment=inferno_thesis: whole examples + 50 sampled tokens, one dense pass
    if row.get("row_limit") not in (None, ""):
        lab += "_ref"  # the reference code's row limit
    return lab + (f"+gen{row['generate']}" if row.get("generate") not in (None, "", "0") else "")


def setting(row: dict) -> str:
    if row.get("pattern") not in (None, "", "unstructured"):
        return row["pattern"]
    return f"{round(float(row['target_sparsity']) * 100)}%"


def load(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.rglob("points.csv")):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                r["label"] = label(r)
                r["setting"] = "dense" if r["method"] == "dense" else setting(r)
                rows.append(r)
    return rows


def stats(values: list[float]) -> tuple[float, float, int]:
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def fmt(v: tuple[float, float, int], digits: int = 2) -> str:
    mean, std, n = v
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def collect(rows):
    """(model, task, setting, label, metric) -> list of values; dense rows are deduplicated per (model, task)."""
    out = defaultdict(list)
    seen_dense = set()
    for r in rows:
        key = (r["model"], r["task"], r["setting"], r["label"])
        if r["label"] == "dense":
            if (r["model"], r["task"]) in seen_dense:
                continue
            seen_dense.add((r["model"], r["task"]))
        metrics = {"perplexity": r["value"]} if r["metric"] == "perplexity" else {
            "acc": r["value"], "acc_norm": r.get("acc_norm"), "task_nll": r.get("task_nll")}
        metrics["sparsity"] = r.get("sparsity")  # achieved
        for k, v in metrics.items():
            if v not in (None, ""):
                out[(*key, k)].append(float(v))
    return out


def table(rows, data) -> str:
    models = sorted({r["model"] for r in rows})
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)] + sorted({r["task"] for r in rows} - set(TASKS))
    labels = [x for x in ORDER if any(r["label"] == x for r in rows)] + sorted({r["label"] for r in rows} - set(ORDER))
    lines = []
    for model in models:
        for st in SETTINGS:
            if not any(r["model"] == model and r["setting"] == st for r in rows):
                continue
            lines.append(f"\n### {model}, {st}\n")
            head = ["method"]
            for t in tasks:
                head += [f"{t} ppl ↓"] if t in PPL_TASKS else [f"{t} acc", f"{t} acc_norm", f"{t} task_nll ↓"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for lab in labels:
                cells, any_value = [lab], False
                for t in tasks:
                    s = "dense" if lab == "dense" else st
                    mets = ["perplexity"] if t in PPL_TASKS else ["acc", "acc_norm", "task_nll"]
                    for m in mets:
                        v = stats(data.get((model, t, s, lab, m), []))
                        any_value |= v[2] > 0
                        cells.append(fmt(v, 2 if m == "perplexity" else 3))
                if any_value:
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def known(*values: float) -> bool:
    return not any(math.isnan(v) for v in values)


def checks(data) -> str:
    """The issue's expected outcomes, each with its figures (a failure is a result, not hidden)."""
    out = []

    def mean(model, task, st, lab, m):
        return stats(data.get((model, task, st, lab, m), []))[0]

    def line(ok, text):
        out.append(f"- [{'x' if ok else ' '}] {text}")

    def dense(model, t):  # context: WikiText-2 is far out of the bench LM's domain
        d = mean(model, t, "dense", "dense", "perplexity")
        return f"; dense {d:.2f}" if known(d) else ""

    out.append("'Clearly below' is judged as < 0.95x.\n")
    m_out = "bench_lm_outliers"
    for t in PPL_TASKS:
        w, mg = mean(m_out, t, "50%", "wanda", "perplexity"), mean(m_out, t, "50%", "magnitude", "perplexity")
        if known(w, mg):
            line(w < 0.95 * mg, f"outlier-injected bench LM, {t}, 50 %: Wanda perplexity {w:.2f} vs magnitude "
                 f"{mg:.2f} ({w / mg:.3f}x{dense(m_out, t)})")
    for t in PPL_TASKS:
        for st in ("70%", "2:4"):
            s, mg = mean("bench_lm", t, st, "sparsegpt", "perplexity"), mean("bench_lm", t, st, "magnitude", "perplexity")
            if known(s, mg):
                line(s < 0.95 * mg, f"plain bench LM, {t}, {st}: SparseGPT perplexity {s:.2f} vs magnitude {mg:.2f} "
                     f"({s / mg:.3f}x{dense('bench_lm', t)})")
    wins: dict[str, list[tuple[float, float]]] = {}
    for model in ("bench_lm", "bench_lm_outliers"):
        for t in [t for t in TASKS if t not in PPL_TASKS]:
            for lab in ("inferno_l2", "inferno_skewness"):
                i, wd = mean(model, t, "70%", lab, "task_nll"), mean(model, t, "70%", "wanda", "task_nll")
                if known(i, wd):
                    ia, wa = mean(model, t, "70%", lab, "acc"), mean(model, t, "70%", "wanda", "acc")
                    wins.setdefault(lab, []).append((wd - i, ia - wa))
                    line(i < wd, f"{model}, {t}, 70 %: {lab} (task calibration) task_nll {i:.3f} vs Wanda (generic) "
                         f"{wd:.3f} ({wd - i:+.3f} better); acc {ia:.3f} vs {wa:.3f} ({100 * (ia - wa):+.1f} points)")
    for lab, d in wins.items():
        out.append(f"- {lab} vs Wanda at 70 %: lower task_nll in {sum(x > 0 for x, _ in d)} of {len(d)} (model, task) "
                   f"cells, by {sum(x for x, _ in d) / len(d):+.3f} nats on average; accuracy "
                   f"{100 * sum(a for _, a in d) / len(d):+.1f} points on average")
    return "\n".join(out) or "(no cells for the checks yet)"


MATCHED = [("magnitude", "36%"), ("wanda", "36%"), ("inferno_l2", "36%"), ("inferno_skewness", "36%"),
           ("inferno_skewness_ref", "50%"), ("wanda", "50%"), ("inferno_skewness", "50%")]


def matched(rows, data) -> str:
    """INFERNO-skewness as the reference code runs it (asked 50 %, rows >= 256 left dense) against Wanda and
    skewness at the sparsity it really achieves (36 %), and against the 50 % it claims."""
    lines = []
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    for model in sorted({r["model"] for r in rows}):
        if not any(r["model"] == model and r["label"] == "inferno_skewness_ref" for r in rows):
            continue
        lines.append(f"\n### {model}\n")
        head = ["method", "asked", "achieved sparsity"] + [
            f"{t} ppl ↓" if t in PPL_TASKS else f"{t} task_nll ↓ / acc" for t in tasks]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for lab, st in [("dense", "dense"), *MATCHED]:
            achieved = stats([v for t in tasks for v in data.get((model, t, st, lab, "sparsity"), [])])
            cells = [lab, st, fmt(achieved, 4)]
            for t in tasks:
                if t in PPL_TASKS:
                    cells.append(fmt(stats(data.get((model, t, st, lab, "perplexity"), [])), 2))
                else:
                    n = stats(data.get((model, t, st, lab, "task_nll"), []))
                    a = stats(data.get((model, t, st, lab, "acc"), []))
                    cells.append(f"{fmt(n, 3)} / {fmt(a, 3)}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def beats_dense(data) -> list[str]:
    """Every pruned perplexity mean below its dense perplexity (each needs an explanation)."""
    out = []
    for (model, t, st, lab, m), v in sorted(data.items()):
        if m != "perplexity" or lab == "dense":
            continue
        d = stats(data.get((model, t, "dense", "dense", "perplexity"), []))[0]
        mu = stats(v)[0]
        if known(d, mu) and mu < d:
            out.append(f"{model}, {t}, {st}, {lab}: {mu:.2f} < dense {d:.2f}")
    return out


def plots(rows, data, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model in sorted({r["model"] for r in rows}):
        tasks = [t for t in TASKS if any(r["task"] == t and r["model"] == model for r in rows)]
        if not tasks:
            continue
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
        labels = [x for x in ORDER if x != "dense" and any(r["label"] == x and r["model"] == model for r in rows)]
        for ax, t in zip(axes[0], tasks):
            metric = "perplexity" if t in PPL_TASKS else "task_nll"
            for k, lab in enumerate(labels):
                xs, ys, es = [], [], []
                for j, st in enumerate(SETTINGS):
                    mu, sd, n = stats(data.get((model, t, st, lab, metric), []))
                    if n:
                        xs.append(j + (k - len(labels) / 2) * 0.04)
                        ys.append(mu)
                        es.append(sd)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, label=lab)
            d = stats(data.get((model, t, "dense", "dense", metric), []))
            if d[2]:
                ax.axhline(d[0], color="k", ls="--", lw=1, label="dense")
            ax.set_xticks(range(len(SETTINGS)), SETTINGS)
            ax.set_title(t)
            ax.set_ylabel(metric + " (lower is better)")
            if metric == "perplexity":
                ax.set_yscale("log")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(model)
        fig.tight_layout()
        path = outdir / f"{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?", default="outputs/thesis_llm")
    p.add_argument("--out", default="results/thesis_llm")
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
    seeds = sorted({r.get("calib_seed") for r in rows if r["method"] not in ("dense", "magnitude")})
    md = (f"# thesis_llm: {len(rows)} points from {root}\n\nmean ± std over calibration seeds {', '.join(seeds)} "
          f"(magnitude needs no data: one run). Generic calibration = Tiny Shakespeare; task = the task's own "
          f"unlabeled inputs.\n" + table(rows, data))
    below = beats_dense(data)
    md += ("\n\n## Matched achieved sparsity: the reference code's INFERNO-skewness vs Wanda\n\nmean ± std over seeds; "
           "`inferno_skewness_ref` asks for 50 % with `pruner.row_limit=256` (the reference code's loop bound, scaled "
           "to the bench LM)\n" + matched(rows, data))
    (outdir / "table.md").write_text(md + "\n")
    (outdir / "checks.md").write_text(
        "# Expected outcomes (issues 4 and 9)\n\n" + checks(data) + "\n\n## Pruned perplexity below dense\n\n"
        + ("\n".join(f"- {x}" for x in below) if below else "none") + "\n")
    figs = plots(rows, data, outdir)
    from inferno.report import render as report

    index = report([root], outdir / "report")
    print(md)
    print()
    print(checks(data))
    print("wrote", outdir / "table.md", outdir / "checks.md", *figs, index)


if __name__ == "__main__":
    main()
