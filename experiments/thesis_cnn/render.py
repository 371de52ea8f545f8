"""Render the thesis_cnn tables and curves from the multirun(s) of ``experiment=thesis_cnn``.

    python -m inferno -m experiment=thesis_cnn seed=0,1,2 pruner.budget.macs=0.5,0.25
    python experiments/thesis_cnn/render.py outputs/multiruns/<time> [more dirs] --out results/thesis_cnn

Each run directory (``<multirun>/<n>/``) holds ``points.csv`` and ``summary.json`` (its resolved config gives
``seed`` and ``pruner.budget.macs``; ``.hydra/config.yaml`` is read when the summary is missing). Writes to
``--out``:

- ``table.md``: per budget, per method, mean ± std over seeds of the final model's MACs (fraction of the start
  model's), its test accuracy (every selection is on the validation split), the training examples processed
  with and without the start model's training; then the cost-to-reach tables: for each greedy method, the
  training cost random sampling and the grid need until their selected model (best validation accuracy so
  far, in their training order) has a test accuracy >= greedy's final one, as a multiple of greedy's cost.
- ``curves.png``: per budget, test accuracy against training examples (the baselines' selected-so-far step
  lines per seed, greedy's finals as markers) and against MACs (the baselines' Pareto fronts per seed,
  greedy's selected paths).
- ``points_seed{S}_budget{B}.csv``: each run's points.
- ``report/``: the project's cross-run report of the same runs (``inferno.report``: every method × budget and
  step, mean ± std over seeds, Pareto plots against MACs, effective MACs, latency and training cost, and a
  self-contained ``index.html``); the tables above are the experiment's own (fractions of the start model's
  MACs, cost to reach greedy's accuracy), which the generic report does not compute.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from inferno.tracking import log_x, pareto_front, read_points, selected_path, series_label, truthy

GREEDY = ("greedy_thesis", "greedy_layerwise")
BASELINES = ("random_sampling", "grid")
COLORS = {"dense": "black", "greedy_thesis": "C0", "greedy_layerwise": "C3", "random_sampling": "C1", "grid": "C2",
          "supernet": "C4", "uniform": "C5"}
VARIANT_COLORS = ("C6", "C7", "C8", "C9")
EPS = 1e-9  # test accuracies are float32 read back as text: ">= greedy's" allows for the last digit


def num(row: dict | None, key: str) -> float | None:
    """A finite number from a row (CSV text); None for a missing or blank cell."""
    try:
        x = float(row[key]) if row is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    seed: object
    budget: float | None
    rows: list[dict]


def _config(run: Path) -> dict:
    summary = run / "summary.json"
    if summary.exists():
        try:
            return json.loads(summary.read_text()).get("config") or {}
        except json.JSONDecodeError:
            pass
    hydra = run / ".hydra" / "config.yaml"
    if hydra.exists():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(hydra), resolve=False)
    return {}


def load_runs(dirs: list[Path]) -> list[Run]:
    """Every run under the given multirun (or run) directories; a (seed, budget) met again replaces the
    earlier one (a later directory's rerun), with a warning."""
    found: dict[tuple, Run] = {}
    for d in dirs:
        paths = [d] if (d / "points.csv").exists() else sorted((p.parent for p in d.glob("*/points.csv")),
                                                                key=lambda p: _seed_key(p.name))
        for path in paths:
            cfg = _config(path)
            budget = ((cfg.get("pruner") or {}).get("budget") or {}).get("macs")
            run = Run(path, cfg.get("seed", path.name), float(budget) if budget is not None else None,
                      read_points(path / "points.csv"))
            key = (str(run.seed), run.budget)
            if key in found:
                print(f"warning: seed {run.seed} budget {run.budget}: {path} replaces {found[key].path}",
                      file=sys.stderr)
            found[key] = run
    return list(found.values())


def merge_runs(runs: list[Run], extra: list[Run]) -> list[Run]:
    """Add the method rows of ``extra`` runs (e.g. an ablation run separately on the same start model) to the
    run of the same (seed, budget); their ``dense`` row must equal the run's (same start model), or they are
    refused with a message."""
    by_key = {(str(r.seed), r.budget): r for r in runs}
    for e in extra:
        run = by_key.get((str(e.seed), e.budget))
        if run is None:
            print(f"warning: {e.path}: no main run with seed {e.seed} budget {e.budget}; left out", file=sys.stderr)
            continue
        dense = [next((r for r in x.rows if r["method"] == "dense"), None) for x in (run, e)]
        if None in dense or any(num(dense[0], k) != num(dense[1], k) for k in ("value", "macs", "params")):
            raise SystemExit(f"error: {e.path}: its start model differs from {run.path}'s; cannot merge")
        run.rows = run.rows + [r for r in e.rows if r["method"] != "dense"]
    return runs


def _seed_key(seed) -> tuple:
    s = str(seed)
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def _order(rows: list[dict]) -> list[dict]:
    """In training order: by step, then by cumulative training cost."""
    return sorted(rows, key=lambda r: (num(r, "step") or 0.0, num(r, "train_samples") or 0.0))


def dense_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == "dense"), None)


def final_row(rows: list[dict], label: str) -> dict | None:
    finals = [r for r in rows if series_label(r) == label and r.get("phase") == "final"]
    return _order(finals)[-1] if finals else None


def baseline_rows(rows: list[dict], method: str) -> list[dict]:
    """A baseline's trained models in its training order (random: ``sample`` rows, grid: ``config`` rows)."""
    phase = {"random_sampling": "sample", "grid": "config"}[method]
    return _order([r for r in rows if r["method"] == method and r.get("phase", phase) in (phase, "")])


def under_budget(row: dict) -> bool:
    """The grid's ``under_budget`` column; blank or missing counts as under (the grid trains only those)."""
    return row.get("under_budget") in (None, "") or truthy(row["under_budget"])


def selectable(row: dict) -> bool:
    """A model a baseline may select: under the budget, with a validation accuracy."""
    return under_budget(row) and num(row, "val_value") is not None


def selected_so_far(rows: list[dict]) -> list[tuple[float, dict | None]]:
    """For each model in training order: (cumulative training samples, the model selected so far: the best
    validation accuracy among the selectable ones trained until then, the first of equals)."""
    out, best = [], None
    for r in rows:
        if selectable(r) and (best is None or num(r, "val_value") > num(best, "val_value")):
            best = r
        out.append((num(r, "train_samples") or 0.0, best))
    return out


def cost_to_reach(rows: list[dict], target: float) -> tuple[float | None, float]:
    """(training samples until the selected model's test accuracy >= ``target``, None if never; the
    baseline's whole training cost)."""
    seq = selected_so_far(rows)
    total = max((c for c, _ in seq), default=0.0)
    for cost, best in seq:
        if best is not None and (num(best, "value") or -math.inf) >= target - EPS:
            return cost, total
    return None, total


# ---------------------------------------------------------------- per run: the table's figures
def summarize(rows: list[dict]) -> dict[str, dict]:
    """label -> {frac (MACs / the start model's), acc, with_start, without_start, note} for one run."""
    out: dict[str, dict] = {}
    dense = dense_row(rows)
    start = num(dense, "train_samples") or 0.0
    dense_macs = num(dense, "macs")

    def entry(r, with_start, without_start, note=""):
        macs = num(r, "macs")
        return {"frac": macs / dense_macs if macs is not None and dense_macs else None, "acc": num(r, "value"),
                "with_start": with_start, "without_start": without_start, "note": note}

    if dense:
        out["dense (start model)"] = entry(dense, start, 0.0)
    labels = list(dict.fromkeys(series_label(r) for r in rows))
    for label in [lb for lb in labels if lb.split("[")[0] in GREEDY]:
        f = final_row(rows, label)
        if f:
            total = num(f, "train_samples")
            search = num(f, "search_samples")
            out[label] = entry(f, total, search if search is not None else _minus(total, start))
        ctrl = [r for r in rows if series_label(r) == label and r.get("phase") == "scratch_control"]
        if ctrl:
            c = ctrl[-1]
            own = num(c, "own_samples")
            own = own if own is not None else num(c, "train_samples")
            out[f"{label}: final arch from scratch (control)"] = entry(c, own, own)
    rnd = baseline_rows(rows, "random_sampling")
    if rnd:
        seq = selected_so_far(rnd)
        total, best = seq[-1][0], seq[-1][1]
        if best:
            out["random_sampling: best val of all samples"] = entry(best, total, total, f"{len(rnd)} samples")
    grid = baseline_rows(rows, "grid")
    if grid:
        total = max(num(r, "train_samples") or 0.0 for r in grid)
        under = [r for r in grid if under_budget(r) and num(r, "value") is not None]
        note = f"{len(under)} config{'s' if len(under) != 1 else ''} under budget"
        if len(grid) != len(under):
            note += f" ({len(grid)} trained)"
        best = selected_so_far(grid)[-1][1]
        if under:
            fracs = [e["frac"] for e in (entry(r, 0, 0) for r in under)]
            out["grid: mean of configs under budget"] = {
                "frac": statistics.mean(fracs) if None not in fracs else None,
                "acc": statistics.mean(num(r, "value") for r in under), "with_start": total, "without_start": total,
                "note": note}
        if best:
            out["grid: best val under budget"] = entry(best, total, total, note)
    for label in [lb for lb in labels if lb.split("[")[0] == "supernet"]:
        f = final_row(rows, label)
        if f:
            total, search = num(f, "train_samples"), num(f, "search_samples")
            search = search if search is not None else _minus(total, start)
            out[f"{label} (incl. its supernet training)"] = entry(f, total, search)
            deploy = num(f, "deploy_samples")
            if deploy is not None:
                out[f"{label} (deploy only: pretrained elsewhere)"] = entry(f, deploy, deploy)
    for r in _order(uniform_rows(rows)):
        ratio = num(r, "ratio")
        what = f"{ratio:g} of channels pruned" if ratio is not None else f"step {r.get('step')}"
        name = f"{series_label(r)} ({what})"
        total, search = num(r, "train_samples"), num(r, "search_samples")
        out[name] = entry(r, total, search if search is not None else _minus(total, start))
    return out


def uniform_rows(rows: list[dict]) -> list[dict]:
    """Torch-Pruning's children, one per ratio (not the intermediate ``phase=step`` points)."""
    return [r for r in rows if r["method"] == "uniform" and r.get("phase") in (None, "", "final")]


def _minus(a, b):
    return a - b if a is not None and b is not None else None


# ---------------------------------------------------------------- text
def ms(xs, fmt="{:.4f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def budget_name(b: float | None) -> str:
    return "unknown budget" if b is None else (f"{b:.0%}" if b <= 1 else f"{b:,.0f} MACs")


def budget_tag(b: float | None) -> str:
    return "unknown" if b is None else f"{b:g}"


def reach_rows(runs: list[Run], greedy: str) -> list[dict]:
    """Per seed: greedy's final (test accuracy, search and total cost) and each baseline's cost to reach it."""
    out = []
    for run in sorted(runs, key=lambda r: _seed_key(r.seed)):
        f = final_row(run.rows, greedy)
        if f is None:
            continue
        total = num(f, "train_samples")
        search = num(f, "search_samples")
        if search is None:
            search = _minus(total, num(dense_row(run.rows), "train_samples"))
        row = {"seed": run.seed, "acc": num(f, "value"), "search": search, "total": total}
        for b in BASELINES:
            seq = baseline_rows(run.rows, b)
            row[b] = cost_to_reach(seq, row["acc"]) if seq else None
        out.append(row)
    return out


def _ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def _x(r: float | None, prefix="") -> str:
    return "n/a" if r is None else f"{prefix}{r:.2f}x"


def censored_median(values: list[tuple[float, bool]]) -> tuple[float, bool]:
    """Median of values some of which are only lower bounds ((x, False): the true value is > x): (m, True)
    when it is known, else (a lower bound of it, False)."""
    lo = statistics.median(v for v, _ in values)
    hi = statistics.median(v if exact else math.inf for v, exact in values)
    return lo, lo == hi


def reach_table(runs: list[Run], greedy: str) -> list[str]:
    rows = reach_rows(runs, greedy)
    if not rows:
        return []
    present = [b for b in BASELINES if any(r[b] for r in rows)]
    head = "| seed | greedy test acc | greedy search samples | greedy total samples |"
    rule = "|---|---|---|---|"
    for b in present:
        head += f" {b}: samples to reach | × search | × total |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['seed']} | {r['acc']:.4f} | {_n(r['search'])} | {_n(r['total'])} |"
        for b in present:
            got = r[b]
            if got is None:
                line += " n/a | | |"
            elif got[0] is None:
                line += (f" not reached in {got[1]:,.0f} | > {_x(_ratio(got[1], r['search']))} "
                         f"| > {_x(_ratio(got[1], r['total']))} |")
            else:
                line += f" {got[0]:,.0f} | {_x(_ratio(got[0], r['search']))} | {_x(_ratio(got[0], r['total']))} |"
        lines.append(line)
    lines.append("")
    for b in present:
        got = [(r[b], r) for r in rows if r[b] is not None]
        reached = sum(1 for g, _ in got if g[0] is not None)
        parts = []
        for base, name in (("search", "search cost"), ("total", "total cost")):
            vals = [(_ratio(g[0] if g[0] is not None else g[1], r[base]), g[0] is not None) for g, r in got]
            vals = [(v, exact) for v, exact in vals if v is not None]
            if vals:
                m, exact = censored_median(vals)
                parts.append(f"{'' if exact else '≥ '}{m:.2f}x greedy's {name}")
        lines.append(f"- {b}: median {', '.join(parts) or 'n/a'}; reached in {reached} of {len(got)} seed(s).")
    return lines


def _n(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def render(dirs: list[Path], out: Path, add: list[Path] = ()) -> str:
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit(f"no run with a points.csv under {', '.join(map(str, dirs))}")
    out.mkdir(parents=True, exist_ok=True)
    if add:
        runs = merge_runs(runs, load_runs(list(add)))
    for run in runs:
        dest = out / f"points_seed{run.seed}_budget{budget_tag(run.budget)}.csv"
        if not add:
            shutil.copy(run.path / "points.csv", dest)
            continue
        names = list(dict.fromkeys(k for r in run.rows for k in r))
        with open(dest, "w", newline="") as f:
            w = csv.DictWriter(f, names)
            w.writeheader()
            w.writerows(run.rows)
    budgets = sorted({r.budget for r in runs}, key=lambda b: (b is None, -(b or 0)))
    lines = ["# thesis_cnn", "",
             (f"Runs: {len(runs)} from {', '.join(str(d) for d in dirs)}. Mean ± std over seeds. Test accuracy on "
              "the held-out test split; every selection on the validation split. Samples = training examples "
              "processed; \"with start\" counts the start model's training (the dense MicroCNN), \"without\" only "
              "the method's own; random sampling, the grid and the scratch control never use the start model "
              "(both columns the same). MACs as a fraction of the start model's.")]
    for b in budgets:
        group = sorted((r for r in runs if r.budget == b), key=lambda r: _seed_key(r.seed))
        per_seed = [summarize(r.rows) for r in group]
        labels = list(dict.fromkeys(k for s in per_seed for k in s))
        seeds = ", ".join(str(r.seed) for r in group)
        lines += ["", f"## Budget {budget_name(b)} of the start model's MACs (seeds {seeds})", "",
                  ("| method | MACs (× start) | test acc | train samples with start | train samples without start "
                   "| seeds | note |"),
                  "|---|---|---|---|---|---|---|"]
        for k in labels:
            vals = [s[k] for s in per_seed if k in s]
            notes = [v["note"] for v in vals if v["note"]]
            notes = "" if not notes else notes[0] if len(set(notes)) == 1 else "per seed: " + "; ".join(notes)
            lines.append(f"| {k} | {ms([v['frac'] for v in vals], '{:.3f}')} | {ms([v['acc'] for v in vals])} "
                         f"| {ms([v['with_start'] for v in vals], '{:,.0f}')} "
                         f"| {ms([v['without_start'] for v in vals], '{:,.0f}')} | {len(vals)} | {notes} |")
        for greedy in dict.fromkeys(series_label(r) for run in group for r in run.rows if r["method"] in GREEDY):
            table = reach_table(group, greedy)
            if table:
                lines += ["", f"### Cost to reach {greedy}'s test accuracy, budget {budget_name(b)}", "",
                          (f"Training samples until the baseline's selected model (best validation accuracy so far, "
                           f"in its training order) has a test accuracy >= {greedy}'s final one, and that as a "
                           f"multiple of {greedy}'s search cost (start model excluded) and total cost (included); "
                           "\"not reached in N\": N is the baseline's whole training, a lower bound."), "", *table]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    plot(runs, budgets, out / "curves.png")
    from inferno.report import render as report

    report([*dirs, *add], out / "report")
    return text


# ---------------------------------------------------------------- curves
def _color(label: str, extra: dict) -> str:
    if label in COLORS:
        return COLORS[label]
    return extra.setdefault(label, VARIANT_COLORS[len(extra) % len(VARIANT_COLORS)])


def plot(runs: list[Run], budgets: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(budgets), figsize=(6.2 * len(budgets), 9), squeeze=False)
    handles: dict[str, object] = {}
    extra_colors: dict[str, str] = {}

    def keep(artist, label):
        handles.setdefault(label, artist)

    for j, b in enumerate(budgets):
        group = [r for r in runs if r.budget == b]
        top, bottom = axes[0][j], axes[1][j]
        shown_top, shown_bottom = [], []  # the markers' values (greedy, supernet, uniform, dense)
        lines_top, lines_bottom = [], []  # the baselines' curves
        for run in group:
            rows = run.rows
            dense = dense_row(rows)
            dense_macs = num(dense, "macs")

            def frac(r, dense_macs=dense_macs):
                m = num(r, "macs")
                return m / dense_macs if m is not None and dense_macs else m

            # cost panel: the baselines' selected-so-far step lines
            for method in BASELINES:
                seq = [(c, num(best, "value")) for c, best in selected_so_far(baseline_rows(rows, method)) if best]
                if seq:
                    xs, ys = zip(*seq)
                    (ln,) = top.step(xs, ys, where="post", color=COLORS[method], alpha=0.75, lw=1.4)
                    keep(ln, f"{method}: selected so far (per seed)")
                    lines_top += ys
            # MACs panel: the baselines' Pareto fronts and their other models faint
            for method in BASELINES:
                models = [r for r in baseline_rows(rows, method) if selectable(r) and frac(r) is not None]
                front = pareto_front(models, "macs")
                if front:
                    on = {id(r) for r in front}
                    bottom.scatter([frac(r) for r in models if id(r) not in on],
                                   [num(r, "value") for r in models if id(r) not in on],
                                   s=9, color=COLORS[method], alpha=0.25, linewidths=0)
                    (ln,) = bottom.step([frac(r) for r in front], [num(r, "value") for r in front], where="post",
                                        color=COLORS[method], lw=1.4, marker="o", ms=3, alpha=0.85)
                    keep(ln, f"{method}: Pareto front (per seed)")
                    lines_bottom += [num(r, "value") for r in front]
            # greedy: finals on the cost panel, paths on the MACs panel
            for label in dict.fromkeys(series_label(r) for r in rows if r["method"] in GREEDY):
                c = _color(label, extra_colors)
                f = final_row(rows, label)
                if f is not None and num(f, "value") is not None:
                    total, search = num(f, "train_samples"), num(f, "search_samples")
                    if total is not None:
                        keep(top.scatter([total], [num(f, "value")], color=c, marker="o", s=45, zorder=5),
                             f"{label} final (total cost)")
                    if search:
                        keep(top.scatter([search], [num(f, "value")], facecolors="none", edgecolors=c, marker="o",
                                         s=45, zorder=5), f"{label} final (search cost only)")
                    shown_top.append(num(f, "value"))
                mine = [r for r in rows if series_label(r) == label and r.get("phase") != "scratch_control"]
                chosen = selected_path(mine)
                if not chosen and f is not None:
                    chosen = [f]
                chosen = ([dense] if dense else []) + chosen
                pts = [(frac(r), num(r, "value")) for r in chosen
                       if frac(r) is not None and num(r, "value") is not None]
                if pts:
                    (ln,) = bottom.plot(*zip(*pts), ls="--", lw=1.2, color=c, marker="^", ms=5, zorder=4)
                    keep(ln, f"{label}: selected path")
                    shown_bottom += [y for _, y in pts[1:]]
            # the others as markers: greedy's final architecture trained from scratch, supernet, uniform, dense
            for label in dict.fromkeys(series_label(r) for r in rows if r["method"] in GREEDY):
                for c in (r for r in rows if series_label(r) == label and r.get("phase") == "scratch_control"):
                    own = num(c, "own_samples") if num(c, "own_samples") is not None else num(c, "train_samples")
                    style = {"marker": "D", "s": 35, "facecolors": "none", "edgecolors": _color(label, extra_colors),
                             "zorder": 5}
                    if own is not None and num(c, "value") is not None:
                        keep(top.scatter([own], [num(c, "value")], **style), f"{label}: final arch from scratch")
                    if frac(c) is not None and num(c, "value") is not None:
                        bottom.scatter([frac(c)], [num(c, "value")], **style)
                    shown_top.append(num(c, "value"))
                    shown_bottom.append(num(c, "value"))
            for label in dict.fromkeys(series_label(r) for r in rows if r["method"] == "supernet"):
                f = final_row(rows, label)
                if f is None or num(f, "value") is None:
                    continue
                c = _color("supernet", extra_colors)
                if num(f, "train_samples") is not None:
                    keep(top.scatter([num(f, "train_samples")], [num(f, "value")], color=c, marker="s", s=35, zorder=5),
                         f"{label} (incl. its training)")
                if num(f, "deploy_samples"):
                    keep(top.scatter([num(f, "deploy_samples")], [num(f, "value")], facecolors="none", edgecolors=c,
                                     marker="s", s=35, zorder=5), f"{label} (deploy only)")
                if frac(f) is not None:
                    bottom.scatter([frac(f)], [num(f, "value")], color=c, marker="s", s=35, zorder=5)
                shown_top.append(num(f, "value"))
                shown_bottom.append(num(f, "value"))
            for r in (r for r in uniform_rows(rows) if num(r, "value") is not None):
                if num(r, "train_samples") is not None:
                    keep(top.scatter([num(r, "train_samples")], [num(r, "value")], color=COLORS["uniform"], marker="v",
                                     s=35, zorder=5), "uniform")
                if frac(r) is not None:
                    bottom.scatter([frac(r)], [num(r, "value")], color=COLORS["uniform"], marker="v", s=35, zorder=5)
                shown_top.append(num(r, "value"))
                shown_bottom.append(num(r, "value"))
            if dense and num(dense, "value") is not None:
                if num(dense, "train_samples"):
                    keep(top.scatter([num(dense, "train_samples")], [num(dense, "value")], color="black", marker="*",
                                     s=140, zorder=6), "dense (start model)")
                bottom.scatter([1.0], [num(dense, "value")], color="black", marker="*", s=140, zorder=6)
                shown_top.append(num(dense, "value"))
                shown_bottom.append(num(dense, "value"))
        if b is not None and b <= 1:
            keep(bottom.axvline(b, color="0.5", ls=":", lw=1), "budget")
        name = budget_name(b)
        top.set_title(f"budget {name}: test accuracy vs training cost", fontsize=10)
        top.set_xlabel("training examples processed (log)")
        bottom.set_title(f"budget {name}: test accuracy vs MACs", fontsize=10)
        bottom.set_xlabel("MACs / start model's MACs (log)")
        log_x(top, [x for line in top.get_lines() for x in line.get_xdata()]
              + [x for coll in top.collections for x, _ in coll.get_offsets()])
        log_x(bottom, [x for line in bottom.get_lines() for x in line.get_xdata()]
              + [x for coll in bottom.collections for x, _ in coll.get_offsets()], eng=False)
        for ax, shown, lines in ((top, shown_top, lines_top), (bottom, shown_bottom, lines_bottom)):
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3, which="both", lw=0.5)
            _zoom(ax, shown, lines)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8,
                   frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _zoom(ax, markers: list, lines: list) -> None:
    """A y range for the markers (greedy, supernet, uniform, dense) and the top of the baselines' curves: the
    baselines' cheapest, far less accurate models (a tiny architecture at 0.5) would squash the comparison."""
    markers, lines = [y for y in markers if y is not None], [y for y in lines if y is not None]
    if not markers and not lines:
        return
    hi = max(markers + lines)
    lo = min(markers) if markers else min(lines)
    lo -= max(0.5 * (hi - lo), 0.02)
    ax.set_ylim(max(lo, 0.0), hi + max(0.05 * (hi - lo), 0.002))
    if lines and min(lines) < lo:
        ax.text(0.99, 0.01, "baselines' curves continue below", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="0.4")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("multirun", type=Path, nargs="+", help="multirun directories (or single run directories)")
    ap.add_argument("--out", type=Path, default=Path("results/thesis_cnn"))
    ap.add_argument("--add", type=Path, nargs="*", default=[],
                    help="more multiruns on the same start models (e.g. an ablation): their methods join the runs "
                         "of the same seed and budget")
    args = ap.parse_args()
    print(render(args.multirun, args.out, args.add))
