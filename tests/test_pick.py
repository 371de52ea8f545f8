"""pick: the cheapest configuration within a loss budget equals a brute force over the configurations; the
Auto-PruMUX predictor recovers a surface of its own functional form and picks the true best feasible point."""

import csv
import math

import numpy as np
import pytest

from inferno import pick

GRID_S = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
GRID_N = [1, 2, 4, 8]


def acc(s, n):
    return 0.92 - 0.15 * s * s - 0.01 * math.log2(n) - 0.02 * s * math.log2(n)


def tput(s, n):
    return math.exp(math.log(100) + math.log(2) * math.log2(n) - math.log(1 - s) + 0.05 * s * math.log2(n))


def grid():
    return [{"sparsity": s, "mux_n": n, "value": acc(s, n), "throughput": tput(s, n)} for s in GRID_S for n in GRID_N]


def test_prumux_model_recovers_its_own_class_and_picks_the_true_best():
    pts = grid()
    model = pick.PruMUXModel(pts)
    for p in pts:
        a, t = model.predict(p["sparsity"], p["mux_n"])
        assert a == pytest.approx(p["value"], abs=1e-9) and t == pytest.approx(p["throughput"], rel=1e-9)
    cands = [(s, n) for s in GRID_S for n in GRID_N]
    for budget in (0.012, 0.035, 0.085):
        feasible = [(s, n) for s, n in cands if acc(0, 1) - acc(s, n) <= budget]
        truth = max(feasible, key=lambda c: tput(*c))
        assert pick.pick_prumux(model, cands, acc(0, 1), budget) == truth


def test_prumux_leave_out_predicts_held_out_points():
    pts = grid()
    held = [p for p in pts if p["sparsity"] in (0.3, 0.5)]
    model = pick.PruMUXModel([p for p in pts if p not in held])
    for p in held:
        a, t = model.predict(p["sparsity"], p["mux_n"])
        assert a == pytest.approx(p["value"], abs=1e-6) and t == pytest.approx(p["throughput"], rel=1e-6)
    report = pick.prumux_report(pts, acc(0, 1), budgets=(0.035,), held_out_s=(0.3, 0.5))
    cands = [(s, n) for s in GRID_S for n in GRID_N]
    truth = max([c for c in cands if acc(0, 1) - acc(*c) <= 0.035], key=lambda c: tput(*c))
    assert f"| 0.035 | ({truth[0]:.1f}, {truth[1]}) |" in report and "| yes |" in report


def write_run(path, rows):
    path.mkdir(parents=True)
    cols = ["method", "model", "task", "sparsity", "metric", "value", "latency_ms", "throughput"]
    with open(path / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def runs(tmp_path, metric="accuracy", values=None):
    values = values or {"dense": (0.90, 0.92), "a": (0.89, 0.89), "b": (0.85, 0.87), "c": (0.80, 0.80)}
    cost = {"dense": 10.0, "a": 7.0, "b": 4.0, "c": 2.0}
    for seed in (0, 1):
        rows = [{"method": "dense" if m == "dense" else "uniform", "model": "m", "task": "t",
                 "sparsity": {"dense": 0.0, "a": 0.25, "b": 0.5, "c": 0.75}[m], "metric": metric,
                 "value": v[seed], "latency_ms": cost[m] + seed, "throughput": 100 / cost[m]} for m, v in values.items()]
        write_run(tmp_path / "sweep" / str(seed), rows)
    return tmp_path / "sweep"


def brute(values, max_loss, lower=False, relative=False):
    ref = np.mean(values["dense"])
    best = None
    for m, v in values.items():
        loss = (np.mean(v) - ref) if lower else (ref - np.mean(v))
        loss = loss / ref if relative else loss
        if loss <= max_loss + 1e-12 and (best is None or {"dense": 10, "a": 7, "b": 4, "c": 2}[m] < best[1]):
            best = (m, {"dense": 10, "a": 7, "b": 4, "c": 2}[m])
    return best[0]


SPARSITY = {"dense": 0.0, "a": 0.25, "b": 0.5, "c": 0.75}


@pytest.mark.parametrize("max_loss", [0.0, 0.02, 0.05, 0.2])
def test_generic_pick_equals_brute_force(tmp_path, max_loss):
    root = runs(tmp_path)
    values = {"dense": (0.90, 0.92), "a": (0.89, 0.89), "b": (0.85, 0.87), "c": (0.80, 0.80)}
    best, _table = pick.pick(pick.load_points([root]), max_loss, "latency_ms")
    assert best["setting"] == SPARSITY[brute(values, max_loss)]
    assert best["n"] == 2 and best["latency_ms"] == pytest.approx({0.0: 10.5, 0.25: 7.5, 0.5: 4.5, 0.75: 2.5}[best["setting"]])


def test_perplexity_relative_and_maximised_columns(tmp_path):
    values = {"dense": (20.0, 22.0), "a": (21.5, 21.5), "b": (24.0, 24.0), "c": (40.0, 40.0)}
    root = runs(tmp_path, "perplexity", values)
    rows = pick.load_points([root])
    assert pick.pick(rows, 1.0, "latency_ms")[0]["setting"] == SPARSITY[brute(values, 1.0, lower=True)]
    assert pick.pick(rows, 0.1, "latency_ms", relative=True)[0]["setting"] == SPARSITY[
        brute(values, 0.1, lower=True, relative=True)]
    assert pick.pick(rows, 1.0, "throughput")[0]["setting"] == 0.25  # highest throughput among dense and a


def test_cli(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pick_cli", Path(__file__).parents[1] / "scripts" / "pick.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root = runs(tmp_path)
    assert cli.main([str(root), "--max-loss", "0.05", "--by", "latency_ms"]) == 0
    out = capsys.readouterr().out
    assert "m on t: within loss 0.05 of dense (accuracy 0.9100): cheapest by latency_ms is method=uniform setting=0.5" in out
    assert cli.main([str(tmp_path / "nowhere"), "--max-loss", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]
    assert cli.main([str(root), "--max-loss", "0.05", "--by", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --by: no numeric column 'nope'")
