"""The points schema and where points go: ``points.csv`` (always, appended row by row so a crash loses
nothing), every active Lightning logger, then ``summary.json`` and ``curve.png`` at the end."""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

COLUMNS = (
    "method", "step", "model", "task", "sparsity", "params", "macs", "latency_ms", "peak_mem_mb",
    "train_samples", "train_macs", "metric", "value", "wall_s",
)
# Cost columns every point has too, right after the contract ones: MACs of the non-zero weights only, and the
# non-zero fraction of the prunable weights (see inferno.cost).
COST_COLUMNS = ("effective_macs", "density")
# Columns ``curve.png`` can plot quality against (``plot.x_axes``).
AXES = ("macs", "effective_macs", "params", "latency_ms", "peak_mem_mb", "train_samples", "train_macs", "sparsity",
        "density", "wall_s")
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


def read_points(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Tracker:
    """Receives every point of a run and writes it everywhere it belongs."""

    def __init__(self, run_dir: str | Path, loggers: Iterable = (), config: dict | None = None, x_axes=("macs", "train_samples")):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers = [lg for lg in loggers if lg is not None]
        self.config = config or {}
        self.x_axes = x_axes
        self.points: list[Point] = []
        self.csv_path = self.run_dir / "points.csv"
        self._fieldnames: list[str] | None = None
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
        return point

    def _rewrite(self, new_keys: list[str]) -> None:
        """A point with a new extra column: rewrite the file with the union of columns."""
        names = list(self._fieldnames or COLUMNS + COST_COLUMNS)
        names += [k for k in new_keys if k not in names]
        self._fieldnames = names
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, names)
            w.writeheader()
            w.writerows(p.row() for p in self.points)

    def best(self) -> dict[str, dict]:
        """Best point per method on its own metric (the last point's metric, e.g. accuracy)."""
        out: dict[str, dict] = {}
        for p in self.points:
            better = HIGHER_IS_BETTER.get(p.metric, True)
            cur = out.get(p.method)
            if cur is None or (p.value > cur["value"] if better else p.value < cur["value"]):
                out[p.method] = p.row()
        return out

    def finish(self, objective: float | None = None) -> dict:
        summary = {
            "config": self.config,
            "versions": versions(),
            "best": self.best(),
            "objective": objective,
            "n_points": len(self.points),
            "wall_s": self.elapsed(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        png = plot_curve([p.row() for p in self.points], self.run_dir / "curve.png", self.x_axes)
        for lg in self.loggers:
            _log_tables(lg, self.points, png, self.x_axes)
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


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_curve(rows: list[dict], path: str | Path, x_axes=("macs", "train_samples")) -> Path:
    """Quality against each cost axis (one panel per axis, one line per method, log-x); points without a
    value on an axis are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({r["metric"] for r in rows}) or ["value"]
    fig, axes = plt.subplots(len(metrics), len(x_axes), figsize=(5.5 * len(x_axes), 4 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, x in enumerate(x_axes):
            ax = axes[i][j]
            methods = dict.fromkeys(r["method"] for r in rows if r["metric"] == metric)
            for method in methods:
                pts = sorted(
                    ((_number(r.get(x)), float(r["value"])) for r in rows if r["method"] == method and r["metric"] == metric
                     and _number(r.get(x)) is not None),
                    key=lambda t: t[0],
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=method)
            values = [v for r in rows if (v := _number(r.get(x))) is not None]
            if any(v > 0 for v in values):
                ax.set_xscale("symlog" if any(v == 0 for v in values) else "log")
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _close(logger) -> None:
    """End a W&B run: Lightning's finalize leaves it open, and the next run in the same process (a
    multirun worker) would otherwise write into it."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


def _log_tables(logger, points: list[Point], png: Path, x_axes=("macs",)) -> None:
    """W&B gets a table of all points, a quality-vs-cost plot per method and axis, and the rendered curve."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or not points:
        return
    import wandb

    rows = [p.row() for p in points]
    cols = list(COLUMNS + COST_COLUMNS)
    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
    payload: dict[str, Any] = {"points": table, "curve": wandb.Image(str(png))}
    for method in dict.fromkeys(r["method"] for r in rows):
        for metric in dict.fromkeys(r["metric"] for r in rows if r["method"] == method):
            for x in x_axes:
                sub = [[r[x], r["value"]] for r in rows if r["method"] == method and r["metric"] == metric
                       and _number(r.get(x)) is not None]
                t = wandb.Table(columns=[x, metric], data=sub)
                payload[f"plots/{method}_{metric}_vs_{x}"] = wandb.plot.line(t, x, metric, title=f"{method}: {metric} vs {x}")
    logger.experiment.log(payload)

