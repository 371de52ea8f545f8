"""The points schema and where points go: ``points.csv`` (always, appended row by row so a crash loses
nothing), every active Lightning logger, then ``summary.json`` and ``curve.png`` at the end."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("inferno")

COLUMNS = (
    "method", "step", "model", "task", "sparsity", "params", "macs", "latency_ms", "peak_mem_mb",
    "train_samples", "train_macs", "metric", "value", "wall_s",
)
# Cost columns every point has too, right after the contract ones: MACs of the non-zero weights only, and the
# non-zero fraction of the prunable weights (see inferno.cost).
COST_COLUMNS = ("effective_macs", "density")
# Columns ``curve.png`` can plot quality against (``plot.x_axes``).
AXES = ("macs", "effective_macs", "params", "latency_ms", "peak_mem_mb", "train_samples", "train_macs", "sparsity",
        "density", "wall_s", "throughput", "decode_tok_s")
# Axes where more is cheaper (a front is then the best quality at >= x); on the others more costs more.
BENEFIT_AXES = frozenset({"sparsity", "throughput", "decode_tok_s"})
# Fractions in [0, 1]: plotted on a linear x axis.
FRACTION_AXES = frozenset({"sparsity", "density"})
HIGHER_IS_BETTER = {"accuracy": True, "acc": True, "acc_norm": True, "perplexity": False, "task_nll": False, "loss": False}


@dataclass
class Point:
    """One evaluated model. The contract columns first, then ``COST_COLUMNS`` (None in points saved before
    they existed); ``extra`` holds method-specific columns (e.g. ``val_value``, ``arch``, ``device``) that go
    into the CSV after them."""

    method: str
    step: int
    model: str
    task: str
    sparsity: float
    params: int
    macs: int
    latency_ms: float
    peak_mem_mb: float
    train_samples: int
    train_macs: int
    metric: str
    value: float
    wall_s: float
    effective_macs: int | None = None
    density: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in self.extra.items()})
        return d


def read_points(path: str | Path, repair: bool = False) -> list[dict[str, str]]:
    """The rows of a ``points.csv``. Every complete row ends with a line break (the csv writer's), so a last
    line without one was cut by a crash mid-append: it is dropped with a warning and, with ``repair``, cut
    from the file too (which then holds the complete rows only). A damaged row elsewhere raises a ValueError
    naming the file and line."""
    path = Path(path)
    with open(path, newline="") as f:
        text = f.read()
    cut = "" if text.endswith("\n") or not text else text[text.rfind("\n") + 1:]
    if cut:
        text = text[: len(text) - len(cut)]
        log.warning(f"{path}: dropped a last line cut by a crash ({len(cut)} characters)")
        if repair:
            with open(path, "r+", newline="") as f:
                f.truncate(len(text.encode()))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    for i, row in enumerate(rows):
        if None in row or None in row.values():  # more or fewer fields than the header names
            raise ValueError(f"{path}: line {i + 2} does not have the header's {len(reader.fieldnames or [])} fields")
    return rows


class Tracker:
    """Receives every point of a run and writes it everywhere it belongs."""

    def __init__(self, run_dir: str | Path, loggers: Iterable = (), config: dict | None = None, x_axes=("macs", "train_samples")):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers = [lg for lg in loggers if lg is not None]
        self.config = config or {}
        self.x_axes = x_axes
        self.points: list[Point] = []
        self.curves: dict[str, dict[str, list[float]]] = {}  # per-epoch training curves by name (add_curve)
        self.csv_path = self.run_dir / "points.csv"
        self._fieldnames: list[str] | None = None
        if self.csv_path.is_file():  # a rerun in the same folder (e.g. after a crash): keep what the last one wrote
            try:
                kept = read_points(self.csv_path, repair=True)
            except ValueError as e:  # a damaged row that is not the last: refuse rather than guess (nothing is moved)
                from inferno.errors import ConfigError

                raise ConfigError(f"hydra.run.dir: {e}; move that file away (or run in another folder) to start "
                                  "this run there") from e
            os.replace(self.csv_path, self.run_dir / "points.previous.csv")
            log.info(f"{self.csv_path}: an earlier run's {len(kept)} points moved to points.previous.csv; a search "
                     "replays its saved points into the new file")
        self.t0 = time.time()
        for lg in self.loggers:
            if self.config:
                lg.log_hyperparams(self.config)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def add(self, point: Point) -> Point:
        self.points.append(point)
        row = point.row()
        keys = list(row)
        if self._fieldnames is None or any(k not in self._fieldnames for k in keys):
            self._rewrite(keys)
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self._fieldnames).writerow(row)
        numeric = {f"{point.method}/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for lg in self.loggers:
            lg.log_metrics(numeric, step=len(self.points) - 1)
        log.info(f"point {len(self.points) - 1}: {point.method} step {point.step}: {point.metric} {point.value:.6g}, "
                 f"macs {point.macs}, train_samples {point.train_samples}")
        return point

    def add_curve(self, name: str, curves: dict[str, list[float]] | None) -> None:
        """Per-epoch training curves of one fit (``train_loss``, ``train_accuracy``, ``val_accuracy``: one value
        per epoch), named by method and step (e.g. ``greedy_layerwise/step2/child0``): every logger gets
        ``curves/<name>/<series>`` at step = epoch, ``summary.json`` keeps them under ``curves``; points.csv is
        not touched. A name given again (a retrained model) gets a ``_2`` suffix."""
        curves = {k: [float(v) for v in vs] for k, vs in (curves or {}).items() if vs}
        if not curves:
            return
        base, k = name, 1
        while name in self.curves:
            k += 1
            name = f"{base}_{k}"
        self.curves[name] = curves
        for lg in self.loggers:
            for epoch in range(max(len(v) for v in curves.values())):
                lg.log_metrics({f"curves/{name}/{s}": v[epoch] for s, v in curves.items() if epoch < len(v)}, step=epoch)

    def update(self, point: Point, **extra) -> Point:
        """Set extra columns on a point recorded earlier (e.g. ``selected=True`` on the child a greedy step
        keeps) and rewrite ``points.csv`` with them. ``point`` is the object ``add`` returned (or one equal to
        a recorded point); the loggers see the new values in the table logged at ``finish``."""
        match = next((p for p in self.points if p is point), None)
        if match is None:
            match = next((p for p in self.points if p == point), None)
        if match is None:
            raise ValueError(f"Tracker.update: no recorded point {point.method} step {point.step} "
                             f"(value {point.value})")
        match.extra.update(extra)
        self._rewrite(list(match.row()))
        return match

    def _rewrite(self, new_keys: list[str]) -> None:
        """Rewrite the file with the union of columns (a point with a new extra column, or an updated point);
        written beside and moved into place, so that a crash mid-write leaves the previous file."""
        names = list(self._fieldnames or COLUMNS + COST_COLUMNS)
        names += [k for k in new_keys if k not in names]
        self._fieldnames = names
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, names)
            w.writeheader()
            w.writerows(p.row() for p in self.points)
        os.replace(tmp, self.csv_path)

    def best(self) -> dict[str, dict]:
        """Best point per method on its own metric (the last point's metric, e.g. accuracy)."""
        out: dict[str, dict] = {}
        for p in self.points:
            better = HIGHER_IS_BETTER.get(p.metric, True)
            cur = out.get(p.method)
            if cur is None or (p.value > cur["value"] if better else p.value < cur["value"]):
                out[p.method] = p.row()
        return out

    def finish(self, objective: float | None = None, results: dict | None = None) -> dict:
        """``summary.json`` (``results``: what each method reported, e.g. greedy's path, the grid's mean and
        Pareto front), ``curve.png``, and the loggers' last words."""
        summary = {
            "config": self.config,
            "versions": versions(),
            "best": self.best(),
            "objective": objective,
            "results": results or {},
            "n_points": len(self.points),
            "wall_s": self.elapsed(),
            "curves": self.curves,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        png = plot_curve([p.row() for p in self.points], self.run_dir / "curve.png", self.x_axes)
        for lg in self.loggers:
            _log_tables(lg, self.points, png, self.x_axes)
            _log_files(lg, self.run_dir, summary, png)
            lg.finalize("success")
            _close(lg)
        return summary


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("inferno", "torch", "lightning", "hydra-core", "transformers", "datasets", "wandb", "torch-pruning"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- reading rows back (numbers or CSV strings)
def number(v) -> float | None:
    """A finite float from a number or a CSV string; None for blanks, text, NaN and infinities."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def truthy(v) -> bool:
    """A boolean column, as recorded (``True``) or read back from CSV (``"True"``, ``"False"``, blank)."""
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    if isinstance(v, float) and math.isnan(v):
        return False
    return bool(v)


def series_label(row: dict) -> str:
    """``method``, or ``method[variant]`` for a point with a ``variant``: one color and one front each."""
    variant = row.get("variant")
    return f"{row['method']}[{variant}]" if variant not in (None, "") else str(row["method"])


def pareto_front(points: list[dict], x: str, higher_is_better: bool = True, y: str = "value",
                 x_is_cost: bool | None = None) -> list[dict]:
    """The points no other point beats: each strictly better on ``y`` than every other point of lower or
    equal cost ``x`` (lower ``y`` is better when ``higher_is_better`` is false, e.g. perplexity; higher ``x``
    is cheaper when ``x_is_cost`` is false, by default for ``BENEFIT_AXES`` such as sparsity). Of points
    equal on both, the first in ``points`` stands for them. Points without a finite number on ``x`` or ``y``
    are left out. Returns the given dicts (rows with numbers or CSV strings), sorted by increasing ``x``."""
    if x_is_cost is None:
        x_is_cost = x not in BENEFIT_AXES
    sx, sy = (1.0 if x_is_cost else -1.0), (1.0 if higher_is_better else -1.0)
    valid = []
    for i, p in enumerate(points):
        cx, cy = number(p.get(x)), number(p.get(y))
        if cx is not None and cy is not None:
            valid.append((sx * cx, sy * cy, i, p))
    valid.sort(key=lambda t: (t[0], -t[1], t[2]))  # cheapest first, the best of equal cost first
    front, best = [], -math.inf
    for _, q, _, p in valid:
        if q > best:
            front.append(p)
            best = q
    return front if x_is_cost else front[::-1]


def selected_path(rows: list[dict]) -> list[dict]:
    """A search's chosen path: the rows marked ``selected`` plus its ``phase == "final"`` row, in ``step``
    order; empty when no row is marked (a method that does not record a path)."""
    if not any(truthy(r.get("selected")) for r in rows):
        return []
    path = [r for r in rows if truthy(r.get("selected")) or r.get("phase") == "final"]
    return sorted(path, key=lambda r: (number(r.get("step")) or 0.0, r.get("phase") == "final"))


def _colors(labels: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(k % cmap.N) for k, label in enumerate(labels)}


def _scale_x(ax, x: str, xs: list[float]) -> None:
    """Log-x for cost axes; fractions (sparsity, density) stay linear."""
    if x not in FRACTION_AXES:
        log_x(ax, xs)


def log_x(ax, xs: list[float], eng: bool = True) -> None:
    """Log-x over the positive values ``xs`` (symlog, linear below the smallest one, when there are zeros),
    with short tick labels: engineering ones (3.7M, 200k) or, ``eng=False``, plain numbers (0.25); within a
    decade every minor tick labelled, within two the 2x and 5x ones. Nothing to do without a positive value."""
    from matplotlib.ticker import EngFormatter, FuncFormatter

    positive = [v for v in xs if v is not None and v > 0]
    if not positive:
        return
    if any(v is not None and v <= 0 for v in xs):
        ax.set_xscale("symlog", linthresh=min(positive))
    else:
        ax.set_xscale("log")
    fmt = EngFormatter(sep="") if eng else (lambda v, pos=None: f"{v:g}")

    def minor(v, pos=None):
        lo, hi = (max(abs(t), 1e-300) for t in ax.get_xlim())
        decades = abs(math.log10(hi / lo))
        if v <= 0 or decades > 2:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return fmt(v) if decades <= 1 or lead in (2, 5) else ""

    ax.xaxis.set_major_formatter(fmt if eng else FuncFormatter(fmt))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _limit_y(ax, shown: list[float], every: list[float], higher_is_better: bool) -> None:
    """Zoom on the fronts and paths when faint points far worse would squash them; say how many are off-scale."""
    if not shown or not every:
        return
    lo, hi = min(shown), max(shown)
    pad = max(0.08 * (hi - lo), 0.002 * max(abs(hi), abs(lo)), 1e-9)
    lo, hi = lo - pad, hi + pad
    if max(every) - min(every) <= 2.5 * (hi - lo):
        return
    ax.set_ylim(lo, hi)
    off = sum(1 for v in every if v < lo or v > hi)
    if off:
        ax.text(0.01, 0.01 if higher_is_better else 0.99, f"{off} worse point(s) off-scale", transform=ax.transAxes,
                fontsize=7, color="0.4", va="bottom" if higher_is_better else "top")


def _xy(rows: list[dict], x: str) -> tuple[list[float], list[float]]:
    return [number(r[x]) for r in rows], [number(r["value"]) for r in rows]


def plot_curve(rows: list[dict], path: str | Path, x_axes=("macs", "train_samples")) -> Path:
    """Quality against each cost axis: one panel per metric and axis, one color per ``method[variant]``.
    Per method: its Pareto front (best quality at <= cost) as a step line, its other points faint, a search's
    selected path (``selected`` rows and its final, in step order, from the start model) dashed; the start
    model (``dense``) a star; ``phase == "scratch_control"`` points hollow diamonds with their own legend
    entry. Log-x (symlog with zeros); points without a number on an axis are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if number(r.get("value")) is not None]
    metrics = sorted({str(r["metric"]) for r in rows}) or ["value"]
    colors = _colors(list(dict.fromkeys(series_label(r) for r in rows if r["method"] != "dense")))
    fig, axes = plt.subplots(len(metrics), len(x_axes), figsize=(5.2 * len(x_axes), 3.9 * len(metrics)), squeeze=False)
    legend: dict[str, Line2D] = {}
    styles: set[str] = set()
    for i, metric in enumerate(metrics):
        for j, x in enumerate(x_axes):
            pts = [r for r in rows if r["metric"] == metric and number(r.get(x)) is not None]
            _panel(axes[i][j], pts, x, metric, colors, legend, styles)
    key = {"front": Line2D([], [], color="0.3", lw=1.8, marker="o", ms=4, label="Pareto front (best at <= cost)"),
           "path": Line2D([], [], color="0.3", lw=1.2, ls="--", marker="^", ms=5, label="selected path"),
           "others": Line2D([], [], ls="none", color="0.3", alpha=0.4, marker="o", ms=3, label="other points")}
    handles = list(legend.values()) + [h for k, h in key.items() if k in styles]
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _panel(ax, pts: list[dict], x: str, metric: str, colors: dict, legend: dict, styles: set) -> None:
    """One panel of ``plot_curve``: ``pts`` (one metric, a number on ``x``); fills the shared legend."""
    from matplotlib.lines import Line2D

    hib = HIGHER_IS_BETTER.get(metric, True)
    dense = [r for r in pts if r["method"] == "dense"]
    shown: list[float] = []  # the values of what is drawn strongly: the y range zooms on them
    for label in dict.fromkeys(series_label(r) for r in pts if r["method"] != "dense"):
        c = colors[label]
        mine = [r for r in pts if series_label(r) == label and r["method"] != "dense"]
        main = [r for r in mine if r.get("phase") != "scratch_control"]
        control = [r for r in mine if r.get("phase") == "scratch_control"]
        front = pareto_front(main, x, hib)
        on = {id(r) for r in front}
        where = "post" if x not in BENEFIT_AXES else "pre"  # the best at <= cost (>= sparsity) holds until the next
        others = [r for r in main if id(r) not in on]
        if others:
            ax.scatter(*_xy(others, x), s=10, color=c, alpha=0.25, linewidths=0, zorder=2)
            styles.add("others")
        if front:
            fx, fy = _xy(front, x)
            ax.step(fx, fy, where=where, color=c, lw=1.8, marker="o", ms=4, zorder=3)
            shown += fy
            styles.add("front")
            legend.setdefault(label, Line2D([], [], color=c, lw=1.8, marker="o", ms=4, label=label))
        chosen = selected_path(main)
        if chosen:
            px, py = _xy(dense + chosen if len(dense) == 1 else chosen, x)  # from the start model
            ax.plot(px, py, ls="--", lw=1.2, color=c, marker="^", ms=5, zorder=4)
            shown += py
            styles.add("path")
        if control:
            cx, cy = _xy(control, x)
            ax.scatter(cx, cy, marker="D", s=30, facecolors="none", edgecolors=[c], alpha=0.6, zorder=3)
            shown += cy
            name = f"{label} scratch control"
            legend.setdefault(name, Line2D([], [], ls="none", marker="D", mfc="none", mec=c, alpha=0.6, label=name))
    if dense:
        dx, dy = _xy(dense, x)
        ax.scatter(dx, dy, marker="*", s=150, color="black", edgecolors="white", linewidths=0.5, zorder=5)
        shown += dy
        legend.setdefault("dense", Line2D([], [], ls="none", marker="*", ms=11, color="black", label="dense"))
    xs, ys = _xy(pts, x)
    _scale_x(ax, x, xs)
    if not hib and ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")  # perplexity blowing up at high sparsity
    else:
        _limit_y(ax, shown, ys, hib)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
    ax.set_title(f"{metric} vs {x}", fontsize=10)
    ax.grid(alpha=0.3, which="both", lw=0.5)
    if not pts:
        ax.text(0.5, 0.5, f"no point has {x}", transform=ax.transAxes, ha="center", color="0.4")


def _log_files(logger, run_dir: Path, summary: dict, png: Path) -> None:
    """The run's files for loggers that keep files: MLflow gets ``summary.json``, ``curve.png`` and
    ``points.csv`` as artifacts of its run; TensorBoard the curve as an image and the summary (best point per
    method, objective, wall time) as text. W&B's are in ``_log_tables``; the CSV logger keeps metrics only."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    if isinstance(logger, MLFlowLogger):
        for name in ("summary.json", "curve.png", "points.csv"):
            if (run_dir / name).is_file():
                logger.experiment.log_artifact(logger.run_id, str(run_dir / name))
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np
        from PIL import Image

        if png.is_file():
            img = np.asarray(Image.open(png).convert("RGB"))
            logger.experiment.add_image("curve", img, dataformats="HWC")
        brief = {k: summary.get(k) for k in ("best", "objective", "n_points", "wall_s")}
        text = json.dumps(brief, indent=2, default=str)
        logger.experiment.add_text("summary", "\n".join("    " + line for line in text.splitlines()))
        logger.experiment.flush()


def _close(logger) -> None:
    """End a W&B run: Lightning's finalize leaves it open, and the next run in the same process (a
    multirun worker) would otherwise write into it."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


def pareto_series(rows: list[dict], x_axes=("macs",)) -> list[tuple[str, str, str, list[list[float]]]]:
    """``(label, metric, x, [[x, value], ...])``: the Pareto front of each ``method[variant]`` per metric and
    axis (scratch controls left out), by increasing ``x``."""
    out = []
    for label in dict.fromkeys(series_label(r) for r in rows):
        mine = [r for r in rows if series_label(r) == label and r.get("phase") != "scratch_control"]
        for metric in dict.fromkeys(r["metric"] for r in mine):
            sub = [r for r in mine if r["metric"] == metric]
            for x in x_axes:
                front = pareto_front(sub, x, HIGHER_IS_BETTER.get(metric, True))
                if front:
                    out.append((label, metric, x, [[number(r[x]), number(r["value"])] for r in front]))
    return out


def _key(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


def _log_tables(logger, points: list[Point], png: Path, x_axes=("macs",)) -> None:
    """W&B gets a table of all points (every column), the rendered curve, and per method, metric and axis
    its Pareto front as a line plot (``pareto/<method>/<metric>_vs_<x>``), plus all fronts of a metric and
    axis in one plot (``pareto/<metric>_vs_<x>``, one line per method)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not points:
        return
    import wandb

    rows = [p.row() for p in points]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows], allow_mixed_types=True)
    payload: dict[str, Any] = {"points": table, "curve": wandb.Image(str(png))}
    together: dict[tuple[str, str], list[list]] = {}
    for label, metric, x, data in pareto_series(rows, x_axes):
        t = wandb.Table(columns=[x, metric], data=data)
        payload[f"pareto/{_key(label)}/{_key(metric)}_vs_{x}"] = wandb.plot.line(
            t, x, metric, title=f"{label}: Pareto front, {metric} vs {x}")
        together.setdefault((metric, x), []).extend([label, *xy] for xy in data)
    for (metric, x), data in together.items():
        t = wandb.Table(columns=["method", x, metric], data=data)
        payload[f"pareto/{_key(metric)}_vs_{x}"] = wandb.plot.line(t, x, metric, stroke="method",
                                                                   title=f"Pareto fronts: {metric} vs {x}")
    logger.experiment.log(payload)
