"""The points schema's helpers (Pareto front, selected path, Tracker.update, curve.png, the W&B payload) and the
thesis_cnn render on a synthetic multirun whose cost-to-reach figures are worked out by hand here."""

import csv
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from inferno.tracking import (
    Point,
    Tracker,
    _log_tables,
    pareto_front,
    pareto_series,
    plot_curve,
    read_points,
    selected_path,
    truthy,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- Pareto front
def brute_front(points, x, higher_is_better=True, x_is_cost=True):
    """Straight from the definition: p is on the front unless another point is at most as costly and at least
    as good and differs from it, or equals it and comes first."""

    def finite(v):
        try:
            return math.isfinite(float(v))
        except (TypeError, ValueError):
            return False

    valid = [(i, float(p[x]), float(p["value"])) for i, p in enumerate(points)
             if finite(p.get(x)) and finite(p.get("value"))]
    keep = []
    for i, xp, yp in valid:
        beaten = False
        for j, xq, yq in valid:
            if j == i:
                continue
            cheaper_eq = xq <= xp if x_is_cost else xq >= xp
            better_eq = yq >= yp if higher_is_better else yq <= yp
            if cheaper_eq and better_eq and ((xq, yq) != (xp, yp) or j < i):
                beaten = True
                break
        if not beaten:
            keep.append((xp, i))
    return [points[i] for _, i in sorted(keep)]


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("x_is_cost", [True, False])
def test_pareto_front_matches_brute_force(higher_is_better, x_is_cost):
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 25)
        points = []
        for _ in range(n):
            # few distinct values: many ties in cost, in quality and in both
            p = {"macs": rng.choice([1, 2, 2, 3, 5, 8, 13]), "value": rng.choice([0.1, 0.5, 0.5, 0.7, 0.9, 0.95])}
            if rng.random() < 0.3:  # read back from CSV
                p = {k: str(v) for k, v in p.items()}
            if rng.random() < 0.05:
                p["macs"] = rng.choice(["", None, "nan", "inf", "n/a"])
            if rng.random() < 0.05:
                p["value"] = ""
            points.append(p)
        got = pareto_front(points, "macs", higher_is_better, x_is_cost=x_is_cost)
        want = brute_front(points, "macs", higher_is_better, x_is_cost)
        assert [id(p) for p in got] == [id(p) for p in want], (trial, points)


def test_pareto_front_by_hand():
    a, b, c, d, e = ({"macs": 1, "value": 0.5}, {"macs": 1, "value": 0.7}, {"macs": 2, "value": 0.7},
                     {"macs": 3, "value": "0.9"}, {"macs": "", "value": 1.0})
    assert pareto_front([a, b, c, d, e], "macs") == [b, d]  # c: as good as b and costlier; e: no cost
    ppl = [{"macs": 1, "value": 30.0}, {"macs": 2, "value": 20.0}, {"macs": 3, "value": 25.0}]
    assert pareto_front(ppl, "macs", higher_is_better=False) == ppl[:2]
    dup = [{"macs": 1, "value": 0.5}, {"macs": 1, "value": 0.5}]
    assert [id(p) for p in pareto_front(dup, "macs")] == [id(dup[0])]
    # sparsity: more is cheaper, by default for that axis; returned by increasing x
    sp = [{"sparsity": 0.5, "value": 0.6}, {"sparsity": 0.7, "value": 0.55}, {"sparsity": 0.7, "value": 0.5},
          {"sparsity": 0.36, "value": 0.58}]
    assert pareto_front(sp, "sparsity") == [sp[0], sp[1]]


def test_truthy_and_selected_path():
    assert [truthy(v) for v in (True, "True", "true", "1", False, "False", "", None, 0, float("nan"))] == \
        [True] * 4 + [False] * 6
    rows = [{"step": "2", "phase": "child", "selected": "True", "id": "b"},
            {"step": "1", "phase": "child", "selected": "False", "id": "x"},
            {"step": "3", "phase": "final", "selected": "", "id": "f"},
            {"step": "1", "phase": "child", "selected": "True", "id": "a"},
            {"step": "3", "phase": "scratch_control", "selected": "", "id": "s"}]
    assert [r["id"] for r in selected_path(rows)] == ["a", "b", "f"]
    assert selected_path([{"step": 1, "phase": "final"}]) == []  # no path recorded


# ---------------------------------------------------------------- Tracker
def point(method="m", step=0, value=0.5, macs=100, **extra):
    return Point(method=method, step=step, model="net", task="t", sparsity=0.0, params=10, macs=macs, latency_ms=1.0,
                 peak_mem_mb=1.0, train_samples=10 * step, train_macs=0, metric="accuracy", value=value, wall_s=0.0,
                 extra=extra)


def test_tracker_update_rewrites_points_csv(tmp_path):
    tr = Tracker(tmp_path)
    kids = [tr.add(point("greedy_thesis", 1, 0.6 + k / 10, phase="child", selected=False)) for k in range(3)]
    chosen = tr.update(kids[1], selected=True)
    assert chosen is kids[1] and kids[1].extra["selected"] is True
    rows = read_points(tmp_path / "points.csv")
    assert [r["selected"] for r in rows] == ["False", "True", "False"]
    # a new column by update; then an equal (not the same) point; then adding goes on in the same file
    tr.update(point("greedy_thesis", 1, 0.6, phase="child", selected=False), score=0.25)
    tr.add(point("greedy_thesis", 2, 0.9, phase="final"))
    rows = read_points(tmp_path / "points.csv")
    assert [r["score"] for r in rows] == ["0.25", "", "", ""]
    assert [r["selected"] for r in rows] == ["False", "True", "False", ""]
    assert [r["phase"] for r in rows][-1] == "final" and len(rows) == 4
    assert not (tmp_path / "points.csv.tmp").exists()
    with pytest.raises(ValueError, match="no recorded point"):
        tr.update(point("other", 5), selected=True)


# ---------------------------------------------------------------- curve.png and W&B
def greedy_like_rows():
    """A greedy search zigzagging between children, a variant, a scratch control, random samples, the start
    model, and an LLM-like method with perplexity at a few sparsities (some without a value on an axis)."""
    rng = random.Random(1)
    rows = [dict(point("dense", 0, 0.99, 1000).row(), train_samples=100)]
    cost = 100
    for step in range(1, 5):
        for k in range(3):
            cost += 20
            sel = k == step % 3
            rows.append(dict(point("greedy_thesis", step, 0.99 - 0.01 * step if sel else rng.uniform(0.43, 0.95),
                                   1000 - 200 * step - 10 * k, phase="child", selected=sel).row(), train_samples=cost))
    rows.append(dict(point("greedy_thesis", 5, 0.97, 200, phase="final", selected=True).row(), train_samples=cost + 50))
    rows.append(dict(point("greedy_layerwise", 3, 0.96, 300, phase="final", variant="no_width").row(),
                     train_samples=200))
    rows.append(dict(point("greedy_layerwise", 4, 0.965, 300, phase="scratch_control").row(), train_samples=100))
    for s in range(8):
        rows.append(dict(point("random_sampling", s + 1, rng.uniform(0.5, 0.98), rng.randint(100, 500),
                               phase="sample").row(), train_samples=100 * (s + 1)))
    for sp, ppl in ((0.5, 30.0), (0.7, 80.0), (0.9, 2000.0)):
        p = point("wanda", 1, ppl, 1000, variant="row").row()
        rows.append(dict(p, metric="perplexity", sparsity=sp, effective_macs=int(1000 * (1 - sp)), train_samples=0))
    return rows


def write_csv(path, rows):
    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, names)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("x_axes", [("macs",), ("macs", "train_samples", "sparsity", "effective_macs")])
def test_plot_curve_from_rows_and_csv(tmp_path, x_axes):
    rows = greedy_like_rows()
    write_csv(tmp_path / "points.csv", rows)
    for name, rs in (("a.png", rows), ("b.png", read_points(tmp_path / "points.csv")), ("empty.png", [])):
        out = plot_curve(rs, tmp_path / name, x_axes)
        assert out.stat().st_size > (10_000 if rs else 1_000)


def test_pareto_series_and_wandb_payload(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    rows = greedy_like_rows()
    series = {(label, metric, x): data for label, metric, x, data in pareto_series(rows, ("macs",))}
    for (label, metric, x), data in series.items():
        mine = [r for r in rows if (r["method"] + (f"[{r['variant']}]" if r.get("variant") else "")) == label
                and r["metric"] == metric and r.get("phase") != "scratch_control"]
        want = brute_front(mine, x, metric != "perplexity")
        assert data == [[float(r[x]), float(r["value"])] for r in want]
    assert ("greedy_layerwise[no_width]", "accuracy", "macs") in series
    assert ("wanda[row]", "perplexity", "macs") in series

    class Run:
        def __init__(self):
            self.logged = []

        def log(self, payload):
            self.logged.append(payload)

        def finish(self):
            pass

    class FakeWandb(WandbLogger):  # W&B's objects are built for real; only the run is a fake
        def __init__(self):
            super().__init__(offline=True, save_dir=str(tmp_path))
            self._experiment = Run()

        @property
        def experiment(self):
            return self._experiment

    points = [Point(**{k: r[k] for k in Point.__dataclass_fields__ if k in r and k != "extra"},
                    extra={k: v for k, v in r.items() if k not in Point.__dataclass_fields__}) for r in rows]
    png = plot_curve(rows, tmp_path / "curve.png", ("macs",))
    lg = FakeWandb()
    _log_tables(lg, points, png, ("macs",))
    (payload,) = lg.experiment.logged
    assert {"points", "curve", "pareto/greedy_thesis/accuracy_vs_macs",
            "pareto/greedy_layerwise_no_width/accuracy_vs_macs", "pareto/accuracy_vs_macs",
            "pareto/perplexity_vs_macs"} <= set(payload)
    assert payload["pareto/greedy_thesis/accuracy_vs_macs"].table.data == series[("greedy_thesis", "accuracy", "macs")]
    assert "selected" in payload["points"].columns and len(payload["points"].data) == len(rows)


# ---------------------------------------------------------------- thesis_cnn render
def load_render():
    name = "thesis_cnn_render"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments/thesis_cnn/render.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before running it: its dataclass looks its module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


def r(method, step, value, macs, train_samples, **extra):
    return {"method": method, "step": step, "metric": "accuracy", "value": value, "macs": macs,
            "train_samples": train_samples, **extra}


def seed0_rows():
    return [
        r("dense", 0, 0.95, 1000, 100, val_value=0.94),
        # greedy_thesis: start 100 + search 300 = 400
        r("greedy_thesis", 1, 0.90, 700, 150, phase="child", selected=False, val_value=0.9),
        r("greedy_thesis", 1, 0.92, 600, 200, phase="child", selected=True, val_value=0.9),
        r("greedy_thesis", 2, 0.91, 450, 250, phase="child", selected=True, val_value=0.9),
        r("greedy_thesis", 3, 0.93, 450, 400, phase="final", selected=True, search_samples=300, val_value=0.92),
        # greedy_layerwise: start 100 + search 150 = 250
        r("greedy_layerwise", 2, 0.96, 480, 250, phase="final", search_samples=150, val_value=0.95),
        r("greedy_layerwise", 3, 0.955, 480, 100, phase="scratch_control", own_samples=100, val_value=0.95),
        # random: the selected model (best val so far) has test .91, .925, .925 (s3's val is lower), .935, .94
        r("random_sampling", 1, 0.91, 400, 50, phase="sample", val_value=0.90, own_samples=50),
        r("random_sampling", 2, 0.925, 420, 100, phase="sample", val_value=0.92, own_samples=50),
        r("random_sampling", 3, 0.95, 430, 150, phase="sample", val_value=0.91, own_samples=50),
        r("random_sampling", 4, 0.935, 440, 200, phase="sample", val_value=0.93, own_samples=50),
        r("random_sampling", 5, 0.94, 450, 250, phase="sample", val_value=0.95, own_samples=50),
        # grid, written out of training order; step 2 over the budget (its val .97 must not be selected);
        # selected: .82 (100), .82 (300), .94 (600), .965 (700)
        r("grid", 3, 0.94, 400, 600, phase="config", under_budget="True", val_value=0.93, B=2, D=1, W=1),
        r("grid", 1, 0.82, 200, 100, phase="config", under_budget="True", val_value=0.80, B=1, D=1, W=1),
        r("grid", 4, 0.965, 480, 700, phase="config", under_budget="True", val_value=0.95, B=2, D=2, W=1),
        r("grid", 2, 0.96, 900, 300, phase="config", under_budget="False", val_value=0.97, B=4, D=3, W=2),
        r("supernet", 3, 0.92, 500, 350, phase="final", search_samples=250, deploy_samples=50, val_value=0.9),
        r("uniform", 1, 0.90, 300, 150, ratio=0.5, val_value=0.9),
    ]


def seed1_rows():
    return [
        r("dense", 0, 0.95, 1000, 100, val_value=0.94),
        r("greedy_thesis", 2, 0.97, 550, 500, phase="final", selected=True, search_samples=400, val_value=0.96),
        r("random_sampling", 1, 0.90, 400, 400, phase="sample", val_value=0.9),
        r("random_sampling", 2, 0.96, 400, 800, phase="sample", val_value=0.95),
        r("grid", 1, 0.98, 400, 600, phase="config", val_value=0.9),  # no under_budget column: counts as under
    ]


def write_run(d: Path, seed, budget, rows):
    d.mkdir(parents=True)
    write_csv(d / "points.csv", rows)
    (d / "summary.json").write_text(json.dumps({"config": {"seed": seed, "pruner": {"budget": {"macs": budget}}}}))


def test_cost_to_reach_by_hand():
    render = load_render()
    rows = seed0_rows()
    rnd, grid = render.baseline_rows(rows, "random_sampling"), render.baseline_rows(rows, "grid")
    assert [x["step"] for x in grid] == [1, 2, 3, 4]
    assert render.cost_to_reach(rnd, 0.93) == (200, 250)
    assert render.cost_to_reach(rnd, 0.96) == (None, 250)
    assert render.cost_to_reach(rnd, 0.91) == (50, 250)
    assert render.cost_to_reach(grid, 0.93) == (600, 700)
    assert render.cost_to_reach(grid, 0.96) == (700, 700)  # not at 300: that config is over the budget
    assert render.cost_to_reach(grid, 0.97) == (None, 700)


def test_render_synthetic_multirun(tmp_path):
    render = load_render()
    multirun = tmp_path / "multirun"
    write_run(multirun / "0", 0, 0.5, seed0_rows())
    write_run(multirun / "1", 1, 0.5, seed1_rows())
    write_run(tmp_path / "other" / "0", 0, 0.25, seed1_rows())  # a second multirun directory
    out = tmp_path / "results"
    text = render.render([multirun, tmp_path / "other"], out)
    assert (out / "table.md").read_text() == text
    assert (out / "curves.png").stat().st_size > 20_000
    assert sorted(p.name for p in out.glob("points_*.csv")) == [
        "points_seed0_budget0.25.csv", "points_seed0_budget0.5.csv", "points_seed1_budget0.5.csv"]
    half, quarter = text.split("## Budget 25%")
    assert "## Budget 50% of the start model's MACs (seeds 0, 1)" in half

    # greedy_thesis, budget 50 %: seed 0 search 300, total 400, test .93: random reaches it at 200
    # (200/300 = 0.67x, 200/400 = 0.50x), the grid at 600 (2.00x, 1.50x); seed 1 search 400, total 500, test .97:
    # random never (800 trained: > 2.00x, > 1.60x), the grid at 600 (1.50x, 1.20x)
    assert "| 0 | 0.9300 | 300 | 400 | 200 | 0.67x | 0.50x | 600 | 2.00x | 1.50x |" in half
    assert "| 1 | 0.9700 | 400 | 500 | not reached in 800 | > 2.00x | > 1.60x | 600 | 1.50x | 1.20x |" in half
    # medians: random 0.67 and > 2.00 -> at least (0.667 + 2.00) / 2 = 1.33; 0.50 and > 1.60 -> at least 1.05
    assert ("- random_sampling: median ≥ 1.33x greedy's search cost, ≥ 1.05x greedy's total cost; "
            "reached in 1 of 2") in half
    # the grid: (2.00 + 1.50) / 2 = 1.75, (1.50 + 1.20) / 2 = 1.35
    assert "- grid: median 1.75x greedy's search cost, 1.35x greedy's total cost; reached in 2 of 2" in half
    # greedy_layerwise (seed 0 only): search 150, total 250, test .96: random never (250: > 1.67x, > 1.00x), the
    # grid at 700 (4.67x, 2.80x)
    assert "| 0 | 0.9600 | 150 | 250 | not reached in 250 | > 1.67x | > 1.00x | 700 | 4.67x | 2.80x |" in half
    assert "- grid: median 4.67x greedy's search cost, 2.80x greedy's total cost; reached in 1 of 1" in half

    def row(section, label):
        return next(line for line in section.splitlines() if line.startswith(f"| {label} |"))

    # MACs / 1000: seed 0 .45, seed 1 .55 -> 0.500 ± 0.071; test .93/.97 -> .95 ± .0283
    assert row(half, "greedy_thesis") == (
        "| greedy_thesis | 0.500 ± 0.071 | 0.9500 ± 0.0283 | 450 ± 71 | 350 ± 71 | 2 |  |")
    assert row(half, "greedy_layerwise: final arch from scratch (control)").startswith(
        "| greedy_layerwise: final arch from scratch (control) | 0.480 | 0.9550 | 100 | 100 | 1 |")
    # grid, seed 0: under the budget .82/.94/.965 -> mean .90833, MACs (200+400+480)/3/1000 = .360, best val .965
    # (MACs .48); seed 1: one config, .98 (MACs .40); both cost 700 and 600. Over the seeds: mean .94417, std
    # .07167/sqrt(2) = .05068; MACs .380 ± .028; best val .9725 ± .0106, MACs .440 ± .057; samples 650 ± 71
    assert row(half, "grid: mean of configs under budget") == (
        "| grid: mean of configs under budget | 0.380 ± 0.028 | 0.9442 ± 0.0507 | 650 ± 71 | 650 ± 71 | 2 "
        "| per seed: 3 configs under budget (4 trained); 1 config under budget |")
    assert row(half, "grid: best val under budget").startswith(
        "| grid: best val under budget | 0.440 ± 0.057 | 0.9725 ± 0.0106 | 650 ± 71 | 650 ± 71 | 2 |")
    # random: seed 0 best val s5 (.94, MACs .45), seed 1 s2 (.96, .40); its whole cost 250 and 800
    assert row(half, "random_sampling: best val of all samples").startswith(
        "| random_sampling: best val of all samples | 0.425 ± 0.035 | 0.9500 ± 0.0141 | 525 ± 389 | 525 ± 389 | 2 |")
    assert row(half, "supernet (incl. its supernet training)").startswith(
        "| supernet (incl. its supernet training) | 0.500 | 0.9200 | 350 | 250 | 1 |")
    assert row(half, "supernet (deploy only: pretrained elsewhere)").startswith(
        "| supernet (deploy only: pretrained elsewhere) | 0.500 | 0.9200 | 50 | 50 | 1 |")
    assert row(half, "uniform (0.5 of channels pruned)").startswith(
        "| uniform (0.5 of channels pruned) | 0.300 | 0.9000 | 150 | 50 | 1 |")
    assert row(half, "dense (start model)").startswith(
        "| dense (start model) | 1.000 ± 0.000 | 0.9500 ± 0.0000 | 100 ± 0 | 0 ± 0 | 2 |")
    assert "greedy_layerwise" not in quarter and "| 0 | 0.9700 | 400 | 500 | not reached in 800 |" in quarter
