"""One report across runs: tables (mean ± std over seeds), Pareto plots and a self-contained ``index.html``.

    python -m inferno.report DIR [DIR ...] --out report/

Every ``points.csv`` under the given run or sweep (multirun) folders is one run; its configuration comes from its
``summary.json`` (the resolved config), else ``.hydra/config.yaml``; ``.hydra/overrides.yaml`` is listed beside it
where present. Writes into ``--out``:

- ``table.csv`` / ``table.md``: one row per (model, task, metric, method, variant, configuration, phase, step):
  * the **configuration** is what distinguishes the runs other than the seed: the resolved-config keys whose values
    differ among the runs that hold points of that (model, task, method), shown as ``key=value`` (empty when they
    differ by seed only). Seed keys (``seed``, ``pruner.seed``: any key named ``seed``) are what is averaged over;
    bookkeeping keys (``logger``, ``paths``, ``plot``, ``group``, ``hydra``, ``hardware.progress_bar``) never
    count; for ``dense`` (the start model, trained before any pruner runs) the ``pruner.*`` keys do not either;
  * per run, the point that stands for the row: where a method records several points of one step and phase (a
    search's candidates), the ``selected`` one, else the best quality (higher accuracy, lower perplexity / loss);
  * the phases that close a search (``final``, ``scratch_control``: :data:`END_PHASES`, when a run records them at
    one step only; uniform's ``final`` points, one per ratio, keep their steps) are one row with step
    ``end`` whatever step each seed's search ended at (a greedy search takes as many steps as its seed needs), so
    the winners are averaged over seeds; ``step_mean`` says where they ended on average;
  * n = the number of distinct seeds (a seed met twice, e.g. the same start model in runs of two budgets, counts
    once: its first run in path order); mean and sample std over them of ``value`` (``metric`` names it) and of the
    cost columns ``macs, effective_macs, latency_ms, train_samples`` (std blank for n = 1).
- ``best.csv`` / ``best.md``: per (model, task, metric, method, variant, configuration), each run's best point
  (as ``summary.json``'s ``best``), mean ± std over seeds.
- ``pareto_<axis>.png`` for ``macs, effective_macs, latency_ms, train_samples`` (``pareto_<model>_<task>_<axis>.png``
  per model and task where the runs hold several): the table's means, drawn by ``inferno.tracking.plot_curve`` (a
  panel per metric; one color and Pareto front per ``method[variant, configuration]``, a search's selected path
  dashed, the dense model a star; log x; the metric's better direction on the y label).
- ``index.html``: everything above in one file with no network references (plots as base64 PNG data URIs), the run
  folders read and when it was made.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import html
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from inferno.pick import lower_is_better
from inferno.tracking import number, plot_curve, read_points, truthy

COSTS = ("macs", "effective_macs", "latency_ms", "train_samples")
END_PHASES = ("final", "scratch_control")  # recorded once, when a search ends: one row over seeds, step "end"
AXES = COSTS  # one Pareto plot each
IGNORED = ("logger", "paths", "plot", "group", "hydra", "hardware.progress_bar")
ROW_KEYS = ("model", "task", "metric", "method", "variant", "configuration", "phase", "step")
BEST_KEYS = ("model", "task", "metric", "method", "variant", "configuration")


class ReportError(ValueError):
    """A one-line reason the report cannot be made (a missing folder, no points)."""


@dataclass
class Run:
    path: Path
    config: dict  # flat: dotted key -> value
    seed: str
    overrides: list[str] | None
    rows: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- reading runs
def _flatten(d, prefix="") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if not prefix:
        return {}
    return {prefix[:-1]: json.dumps(d, sort_keys=True) if isinstance(d, (list, dict)) else d}


def _config(run: Path) -> dict:
    summary = run / "summary.json"
    if summary.is_file():
        try:
            cfg = json.loads(summary.read_text()).get("config")
            if isinstance(cfg, dict):
                return cfg
        except (json.JSONDecodeError, AttributeError):
            pass
    hydra = run / ".hydra" / "config.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(OmegaConf.load(hydra), resolve=False)
        except Exception as e:  # noqa: BLE001 -- an unreadable config: the run still has its points
            print(f"inferno.report: warning: {hydra}: unreadable ({e}); its run has no configuration", file=sys.stderr)
    return {}


def _overrides(run: Path) -> list[str] | None:
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    import yaml

    try:
        got = yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        return None
    return [str(x) for x in got] if isinstance(got, list) else None


def _is_seed(key: str) -> bool:
    return key.split(".")[-1] == "seed"


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED)


def load_runs(dirs) -> list[Run]:
    """Every run (a folder with ``points.csv``) under ``dirs``, in path order; ReportError for a missing folder, a
    folder without any ``points.csv`` or a damaged one."""
    paths: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        found = sorted(d.rglob("points.csv"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                                                           for s in p.parent.parts])
        if not found:
            raise ReportError(f"{d}: no points.csv under it")
        paths += [p.parent for p in found if p.parent.resolve() not in {q.resolve() for q in paths}]
    runs = []
    for p in paths:
        cfg = _flatten(_config(p))
        seeds = [f"{k}={cfg[k]}" for k in sorted(cfg) if _is_seed(k)]
        try:
            rows = read_points(p / "points.csv")  # a last line cut by a crash is dropped, with a warning
        except ValueError as e:
            raise ReportError(str(e)) from e
        runs.append(Run(p, cfg, " ".join(seeds) if seeds else p.name, _overrides(p), rows))
    return runs


# ---------------------------------------------------------------- numbers
def _text(v) -> str:
    return "" if v is None else str(v)


def configurations(runs: list[Run]) -> dict[tuple[int, str, str, str], str]:
    """(run index, model, task, method) -> configuration label: the config keys that differ among the runs with
    points of that (model, task, method), seeds and bookkeeping keys left out (``pruner.*`` too for dense)."""
    holders: dict[tuple, list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        for key in dict.fromkeys((_text(r.get("model")), _text(r.get("task")), _text(r.get("method")))
                                 for r in run.rows):
            holders[key].append(i)
    out = {}
    for (model, task, method), idx in holders.items():
        keys = sorted({k for i in idx for k in runs[i].config})
        keys = [k for k in keys if not _is_seed(k) and not _ignored(k)
                and not (method == "dense" and (k == "pruner" or k.startswith("pruner.")))]
        differ = [k for k in keys if len({json.dumps(runs[i].config.get(k, "<unset>"), default=str) for i in idx}) > 1]
        for i in idx:
            out[(i, model, task, method)] = " ".join(f"{k}={runs[i].config.get(k, '<unset>')}" for k in differ)
    return out


def _better(metric: str):
    """key whose max is the best point of ``metric``."""
    low = lower_is_better(metric)
    return lambda r: (-(number(r.get("value")) or math.inf) if low else (number(r.get("value")) or -math.inf))


def _stats(xs: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def _aggregate(groups: dict[tuple, dict[str, dict]], keys: tuple[str, ...]) -> list[dict]:
    """groups: key -> {seed: representative row}; one output row per key with n and mean/std of value and costs."""
    out = []
    for key, by_seed in groups.items():
        reps = list(by_seed.values())
        row = dict(zip(keys, key))
        row["n"] = len(reps)
        row["seeds"] = " | ".join(by_seed)
        for col in ("value", *COSTS):
            mean, std, _ = _stats([number(r.get(col)) for r in reps])
            row[f"{col}_mean"], row[f"{col}_std"] = mean, std
        if row.get("step") == "end":
            row["step_mean"] = _stats([number(r.get("step")) for r in reps])[0]
        if any("selected" in r for r in reps):
            row["selected"] = all(truthy(r.get("selected")) for r in reps)
        out.append(row)
    return out


def _order(row: dict) -> tuple:
    step = number(row.get("step"))
    return (row["model"], row["task"], row["metric"], row["method"] != "dense", row["method"], row["variant"],
            row["configuration"], row.get("phase", ""), step if step is not None else math.inf, _text(row.get("step")))


def tables(runs: list[Run]) -> tuple[list[dict], list[dict]]:
    """(the per-step table, the best-point table): rows as described in the module docstring."""
    conf = configurations(runs)
    steps: dict[tuple, dict[str, dict]] = {}
    best: dict[tuple, dict[str, dict]] = {}
    for i, run in enumerate(runs):
        mine: dict[tuple, list[dict]] = defaultdict(list)
        series: dict[tuple, list[dict]] = defaultdict(list)
        end_steps: dict[tuple, set] = defaultdict(set)  # a phase at one step only in this run ends its search
        for r in run.rows:
            end_steps[(_text(r.get("method")), _text(r.get("variant")), _text(r.get("phase")))].add(_text(r.get("step")))
        for r in run.rows:
            if number(r.get("value")) is None:
                continue
            base = {k: _text(r.get(k)) for k in ("model", "task", "metric", "method", "variant")}
            base["configuration"] = conf[(i, base["model"], base["task"], base["method"])]
            series[tuple(base[k] for k in BEST_KEYS)].append(r)
            phase = _text(r.get("phase"))
            ends = phase in END_PHASES and len(end_steps[(base["method"], base["variant"], phase)]) == 1
            step = "end" if ends else _text(r.get("step"))
            mine[tuple({**base, "phase": phase, "step": step}[k] for k in ROW_KEYS)].append(r)
        for key, rs in mine.items():
            chosen = [r for r in rs if truthy(r.get("selected"))] or rs
            steps.setdefault(key, {}).setdefault(run.seed, max(chosen, key=_better(key[2])))
        for key, rs in series.items():
            best.setdefault(key, {}).setdefault(run.seed, max(rs, key=_better(key[2])))
    return sorted(_aggregate(steps, ROW_KEYS), key=_order), sorted(_aggregate(best, BEST_KEYS), key=_order)


# ---------------------------------------------------------------- writing
def fmt(x: float | None) -> str:
    """A table cell's number: thousands separated from 1000 up, else 4 significant digits."""
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def pm(row: dict, col: str) -> str:
    mean, std = row.get(f"{col}_mean"), row.get(f"{col}_std")
    if mean is None:
        return "–"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _columns(rows: list[dict], keys: tuple[str, ...]) -> list[str]:
    """The key columns worth showing: variant, configuration and phase only where some row has one."""
    return [k for k in keys if k not in ("variant", "configuration", "phase") or any(r.get(k) for r in rows)]


def _cell(row: dict, key: str) -> str:
    if key == "step" and row.get("step_mean") is not None:  # a search's end, at the mean of the seeds' last steps
        return f"end (mean {fmt(row['step_mean'])})"
    return _text(row.get(key)) or ("—" if key == "configuration" else "")


def _cells(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(rows, keys)
    head = [*cols, "n", "value (mean ± std)", *(f"{c} (mean ± std)" for c in COSTS)]
    body = [[_cell(r, k) for k in cols] + [str(r["n"]), pm(r, "value"),
            *(pm(r, c) for c in COSTS)] for r in rows]
    return head, body


def write_csv(rows: list[dict], keys: tuple[str, ...], path: Path) -> None:
    names = [*keys, "n", "seeds"] + [f"{c}_{s}" for c in ("value", *COSTS) for s in ("mean", "std")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, names, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows)


def markdown(rows: list[dict], keys: tuple[str, ...]) -> str:
    head, body = _cells(rows, keys)
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]) + "\n"


def html_table(rows: list[dict], keys: tuple[str, ...]) -> str:
    head, body = _cells(rows, keys)
    e = html.escape
    return ("<table>\n<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>\n<tbody>\n"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>\n" for line in body)
            + "</tbody>\n</table>")


def plot_rows(table: list[dict]) -> list[dict]:
    """The table's means as points for ``plot_curve``: the configuration joins the variant, so each method ×
    configuration is its own color and front."""
    out = []
    for r in table:
        variant = ", ".join(x for x in (r["variant"], r["configuration"]) if x)
        p = {"method": r["method"], "variant": variant, "metric": r["metric"], "value": r["value_mean"],
             "phase": r.get("phase", ""), "step": r.get("step_mean") if r["step"] == "end" else r["step"],
             **{c: r[f"{c}_mean"] for c in COSTS}}
        if "selected" in r:
            p["selected"] = r["selected"]
        out.append(p)
    return out


def plots(table: list[dict], out: Path) -> list[tuple[str, str, Path]]:
    """``(model/task or "", axis, png)``: ``pareto_<axis>.png`` for one model and task, else
    ``pareto_<model>_<task>_<axis>.png`` per model and task (their fronts in one panel would be unreadable)."""
    where = list(dict.fromkeys((r["model"], r["task"]) for r in table))
    got = []
    for model, task in where:
        rows = plot_rows([r for r in table if (r["model"], r["task"]) == (model, task)])
        tag = "" if len(where) == 1 else re.sub(r"[^\w.-]+", "_", f"{model}_{task}") + "_"
        for x in AXES:
            png = plot_curve(rows, out / f"pareto_{tag}{x}.png", x_axes=(x,))
            got.append(("" if len(where) == 1 else f"{model} / {task}", x, png))
    return got


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px;
margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#eee}
td{font-variant-numeric:tabular-nums}code{font-size:12px}.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;flex:1 1 560px;max-width:900px}figure img{width:100%;height:auto;display:block}
figcaption{font-weight:bold;margin-bottom:.3em}"""
AXIS_NAMES = {"macs": "MACs", "effective_macs": "effective MACs (zero weights skipped)", "latency_ms": "latency (ms)",
              "train_samples": "training cost (examples processed)"}


def render(dirs, out) -> Path:
    """Read the runs under ``dirs`` and write the report into ``out``; returns ``out/index.html``."""
    runs = load_runs(dirs)
    table, best = tables(runs)
    if not table:
        raise ReportError(f"{', '.join(map(str, dirs))}: no point with a value")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, ROW_KEYS, out / "table.csv")
    write_csv(best, BEST_KEYS, out / "best.csv")
    (out / "table.md").write_text(markdown(table, ROW_KEYS))
    (out / "best.md").write_text(markdown(best, BEST_KEYS))
    figures = plots(table, out)
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    e = html.escape
    run_list = "".join(
        f"<tr><td><code>{e(str(r.path))}</code></td><td>{e(r.seed)}</td><td>{len(r.rows)}</td>"
        f"<td><code>{e(' '.join(r.overrides)) if r.overrides is not None else ''}</code></td></tr>\n" for r in runs)
    images, last = "", None
    for where, x, p in figures:
        if where != last:
            images += ("</div>\n" if last is not None else "") + (f"<h3>{e(where)}</h3>\n" if where else "")
            images += '<div class="plots">\n'
            last = where
        images += (f"<figure><figcaption>quality vs {e(AXIS_NAMES[x])}</figcaption><img alt=\"{e(p.name)}\" "
                   f"src=\"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}\"></figure>\n")
    images += "</div>\n"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>INFERNO report</title><style>{STYLE}</style></head>
<body>
<h1>INFERNO report</h1>
<p>Made {e(made)} from {len(runs)} run(s) under {", ".join(f"<code>{e(str(d))}</code>" for d in dirs)}.
Mean ± sample std over seeds (n = distinct seeds). The configuration is what distinguishes runs other than the seed
(config keys differing among the runs of that model, task and method); — where they differ by seed only.</p>
<h2>Best point per method × configuration</h2>
{html_table(best, BEST_KEYS)}
<h2>Pareto plots (means over seeds)</h2>
<p>One color per method [variant, configuration]: its Pareto front (best quality at &lt;= cost) as a line, its
other steps faint, a search's selected path dashed, the dense start model a star.</p>
{images}
<h2>Every step</h2>
<p>Per run the point standing for a step: the selected one where a method marks one, else the best.</p>
{html_table(table, ROW_KEYS)}
<h2>Runs read</h2>
<table><thead><tr><th>run folder</th><th>seed</th><th>points</th><th>Hydra overrides</th></tr></thead>
<tbody>
{run_list}</tbody></table>
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inferno.report", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or sweep (multirun) folders; every points.csv under them")
    ap.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report/)")
    args = ap.parse_args(argv)
    try:
        index = render(args.dirs, args.out)
    except ReportError as e:
        print(f"inferno.report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
