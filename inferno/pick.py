"""Which configuration is cheapest within an accuracy-loss budget -- for any sweep of the project -- and the
Auto-PruMUX predictor.

Generic pick (``scripts/pick.py``): every ``points.csv`` under the given run / sweep folders; rows grouped into
configurations (method, variant, model, task, target sparsity -- or the achieved one --, mux_n), value and cost
averaged over runs (seeds); the reference is the ``dense`` configuration of the same model and task (plain,
``mux_n`` 1 where present); loss = reference - value for metrics where higher is better, value - reference where
lower is better (perplexity, loss, error), divided by |reference| with ``relative``. Feasible = loss <= max_loss
(the dense configuration always is); the answer is the feasible one with the lowest ``by`` column, or the highest
for throughput-like columns (``throughput``, ``decode_tok_s``, ``*_per_s``).

Auto-PruMUX (Su et al. 2023 predict the best (sparsity, N) for an accuracy budget; their fitted model is not
available offline, so these functional forms are the project's design):
* accuracy(s, N) = least squares over [1, s, s^2, log2 N, (log2 N)^2, s log2 N] (terms the data cannot identify --
  fewer distinct s or N values than the term needs -- are dropped);
* log throughput(s, N) = least squares over [1, log2 N, -log(1 - s), s log2 N] (throughput ~ N / (1 - s) to first
  order: N sentences per pass, cost shrinking with the removed parameters);
* the pick: the highest predicted throughput whose predicted accuracy loss (dense accuracy - prediction) is within
  the budget. ``prumux_report`` validates it by leave-out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from inferno.tracking import read_points

KEYS = ("method", "variant", "model", "task", "setting", "mux_n")
LOWER_BETTER = ("perplexity", "loss", "error", "nll")
MAXIMISED = ("throughput", "decode_tok_s")


def lower_is_better(metric: str) -> bool:
    return any(t in str(metric).lower() for t in LOWER_BETTER)


def maximised(column: str) -> bool:
    return column in MAXIMISED or column.endswith(("_per_s", "tok_s"))


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    return x


def load_points(paths) -> list[dict]:
    """Every row of every ``points.csv`` under ``paths`` (folders searched recursively; where a folder has none, its
    ``points*.csv`` files, as ``results/`` stores them), or csv files; numbers parsed, ``source`` = the run folder."""
    rows = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        files = [p] if p.is_file() else (sorted(p.rglob("points.csv")) or sorted(p.rglob("points*.csv")))
        if not files:
            raise ValueError(f"{p}: no points.csv under it")
        for f in files:
            for r in read_points(f):  # a last line cut by a crash is skipped, with a warning
                row = {k: _num(v) for k, v in r.items()}
                row["source"] = str(f.parent)
                rows.append(row)
    return rows


def setting(row: dict) -> float:
    """The configuration's sparsity: the target where the run records one, else the achieved one (3 decimals)."""
    if row.get("method") == "dense":
        return 0.0
    t = row.get("target_sparsity")
    s = t if isinstance(t, float) else row.get("sparsity")
    return round(float(s), 3) if isinstance(s, float) else 0.0


def configurations(rows: list[dict], by: str, keys=KEYS) -> list[dict]:
    """One entry per configuration: its keys, n runs, mean value, mean ``by``."""
    groups = defaultdict(list)
    for r in rows:
        r = {**r, "setting": setting(r)}
        if r.get("mux_n") is None:
            r["mux_n"] = 1.0 if "mux_n" in r else None
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        vals = [r["value"] for r in rs if isinstance(r.get("value"), float)]
        costs = [r[by] for r in rs if isinstance(r.get(by), float)]
        if not vals or not costs:
            continue
        out.append({**dict(zip(keys, key)), "metric": rs[0].get("metric"), "n": len(rs),
                    "value": sum(vals) / len(vals), by: sum(costs) / len(costs)})
    return out


def reference_value(rows: list[dict], model, task) -> float | None:
    dense = [r for r in rows if r.get("method") == "dense" and r.get("model") == model and r.get("task") == task]
    plain = [r for r in dense if r.get("mux_n") in (None, 1.0)] or dense
    vals = [r["value"] for r in plain if isinstance(r.get("value"), float)]
    return sum(vals) / len(vals) if vals else None


def pick(rows: list[dict], max_loss: float, by: str = "latency_ms", relative: bool = False,
         reference: float | None = None) -> tuple[dict | None, list[dict]]:
    """(the cheapest feasible configuration or None, every configuration with its ``loss`` and ``feasible``)."""
    if not isinstance(max_loss, (int, float)) or max_loss < 0 or math.isnan(max_loss):
        raise ValueError(f"--max-loss: {max_loss!r} must be a number >= 0")
    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    if by not in numeric:
        raise ValueError(f"--by: no numeric column {by!r} in the points; available: {', '.join(numeric)}")
    table = configurations(rows, by)
    for c in table:
        ref = reference if reference is not None else reference_value(rows, c["model"], c["task"])
        c["reference"] = ref
        if ref is None:
            c["loss"], c["feasible"] = None, False
            continue
        loss = (c["value"] - ref) if lower_is_better(c["metric"]) else (ref - c["value"])
        c["loss"] = loss / abs(ref) if relative and ref else loss
        c["feasible"] = c["loss"] <= max_loss + 1e-12
    feasible = [c for c in table if c["feasible"]]
    if not feasible:
        return None, table
    best = max(feasible, key=lambda c: c[by]) if maximised(by) else min(feasible, key=lambda c: c[by])
    return best, table


# ----------------------------------------------------------------------------------- Auto-PruMUX
def _acc_features(s, n):
    ln = np.log2(n)
    return np.stack([np.ones_like(s), s, s * s, ln, ln * ln, s * ln], axis=-1)


def _tput_features(s, n):
    ln = np.log2(n)
    return np.stack([np.ones_like(s), ln, -np.log1p(-s), s * ln], axis=-1)


class PruMUXModel:
    """accuracy(s, N) and throughput(s, N) fitted by least squares (forms in the module docstring)."""

    def __init__(self, points: list[dict]):
        pts = [p for p in points if p.get("mux_n") is not None]
        if len(pts) < 3:
            raise ValueError(f"Auto-PruMUX needs points with sparsity and mux_n; got {len(pts)}")
        s = np.array([float(p["sparsity"]) for p in pts])
        n = np.array([float(p["mux_n"]) for p in pts])
        acc = np.array([float(p["value"]) for p in pts])
        tput = np.array([float(p["throughput"]) for p in pts])
        n_s, n_n = len(set(s.round(6))), len(set(n))
        # identifiable terms: s^2 needs 3 distinct s, (log N)^2 3 distinct N, s log N 2 of each
        self.acc_terms = [0, 1, 2, 3, 4, 5]
        if n_s < 3:
            self.acc_terms.remove(2)
        if n_n < 3:
            self.acc_terms.remove(4)
        if n_s < 2 or n_n < 2:
            self.acc_terms.remove(5)
        self.tput_terms = [0, 1, 2, 3] if (n_s >= 2 and n_n >= 2) else [0, 1, 2]
        self.acc_coef = np.linalg.lstsq(_acc_features(s, n)[:, self.acc_terms], acc, rcond=None)[0]
        self.tput_coef = np.linalg.lstsq(_tput_features(s, n)[:, self.tput_terms], np.log(tput), rcond=None)[0]

    def predict(self, s: float, n: float) -> tuple[float, float]:
        s_, n_ = np.array([float(s)]), np.array([float(n)])
        acc = float((_acc_features(s_, n_)[:, self.acc_terms] @ self.acc_coef)[0])
        tput = float(np.exp(_tput_features(s_, n_)[:, self.tput_terms] @ self.tput_coef)[0])
        return acc, tput


def pick_prumux(model: PruMUXModel, candidates, dense_accuracy: float, max_loss: float):
    """The (s, N) of ``candidates`` with the highest predicted throughput whose predicted accuracy loss is within
    ``max_loss``; None if none is."""
    best, best_t = None, -1.0
    for s, n in candidates:
        acc, tput = model.predict(s, n)
        if dense_accuracy - acc <= max_loss + 1e-12 and tput > best_t:
            best, best_t = (s, n), tput
    return best


def true_best(points: list[dict], dense_accuracy: float, max_loss: float):
    """The measured point with the highest throughput whose measured accuracy loss is within the budget."""
    ok = [p for p in points if dense_accuracy - float(p["value"]) <= max_loss + 1e-12]
    return max(ok, key=lambda p: float(p["throughput"])) if ok else None


def prumux_report(points: list[dict], dense_accuracy: float, budgets=(0.01, 0.02, 0.05), held_out_s=(0.5,)) -> str:
    """Markdown: leave-one-out prediction errors over the grid, then a fit on the points whose sparsity is not in
    ``held_out_s`` -- predictions for the held-out ones against the measurements -- and its picks per budget: does
    the picked configuration truly meet the budget, and how does it compare with the truly best feasible one."""
    key = [(float(p["sparsity"]), float(p["mux_n"])) for p in points]
    lines = ["# Auto-PruMUX: predicted vs measured\n",
             ("Functional forms (the project's design, see `inferno/pick.py`): accuracy(s, N) quadratic in s and "
             "log2 N with an interaction; log throughput linear in log2 N, -log(1-s) and s·log2 N.\n"),
             "## Leave-one-out over the grid\n", "| s | N | measured acc | predicted acc | measured tput | predicted tput |",
             "|---|---|---|---|---|---|"]
    acc_err, tput_err = [], []
    for i, (s, n) in enumerate(key):
        model = PruMUXModel([p for j, p in enumerate(points) if j != i])
        a, t = model.predict(s, n)
        ma, mt = float(points[i]["value"]), float(points[i]["throughput"])
        acc_err.append(abs(a - ma))
        tput_err.append(abs(t - mt) / mt)
        lines.append(f"| {s:.1f} | {n:.0f} | {ma:.4f} | {a:.4f} | {mt:.1f} | {t:.1f} |")
    lines.append(f"\nMean absolute accuracy error {np.mean(acc_err):.4f}; mean relative throughput error "
                 f"{np.mean(tput_err):.1%}.\n")
    train = [p for p in points if round(float(p["sparsity"]), 3) not in {round(x, 3) for x in held_out_s}]
    test = [p for p in points if p not in train]
    model = PruMUXModel(train)
    lines += [f"## Fit without s in {list(held_out_s)}, picks among every grid configuration\n",
              ("| budget | picked (s, N) | its predicted acc / tput | its measured acc / tput | meets budget? | truly "
              "best feasible (s, N) | its measured acc / tput |"), "|---|---|---|---|---|---|---|"]
    for b in budgets:
        choice = pick_prumux(model, key, dense_accuracy, b)
        truth = true_best(points, dense_accuracy, b)
        tb = f"({float(truth['sparsity']):.1f}, {float(truth['mux_n']):.0f}) | {float(truth['value']):.4f} / " \
             f"{float(truth['throughput']):.1f}" if truth else "none | -"
        if choice is None:
            lines.append(f"| {b} | none | - | - | - | {tb} |")
            continue
        p = points[key.index(choice)]
        pa, pt = model.predict(*choice)
        meets = dense_accuracy - float(p["value"]) <= b + 1e-12
        lines.append(f"| {b} | ({choice[0]:.1f}, {choice[1]:.0f}) | {pa:.4f} / {pt:.1f} | {float(p['value']):.4f} / "
                     f"{float(p['throughput']):.1f} | {'yes' if meets else 'no'} | {tb} |")
    if test:
        lines += ["\nHeld-out points of that fit:\n", ("| s | N | measured acc | predicted acc | measured tput | "
                  "predicted tput |"), "|---|---|---|---|---|---|"]
        for p in test:
            a, t = model.predict(float(p["sparsity"]), float(p["mux_n"]))
            lines.append(f"| {float(p['sparsity']):.1f} | {float(p['mux_n']):.0f} | {float(p['value']):.4f} | {a:.4f} | "
                         f"{float(p['throughput']):.1f} | {t:.1f} |")
    return "\n".join(lines) + "\n"
