"""``python -m inferno.report``: a report from two real runs (seeds 0 and 1) whose table is checked against the points
computed here, its one-line errors, and its ``index.html`` opened in headless Chromium."""

import csv
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from inferno import report
from inferno.config import CONF_DIR
from inferno.run import run
from inferno.tracking import read_points

ROOT = Path(__file__).resolve().parents[1]
HW = ["logger=none", "hardware.limit_batches=2", "hardware.num_threads=1", "hardware.latency_repeats=1",
      "hardware.latency_batch_size=8", "hardware.progress_bar=false", "train.dense_epochs=1"]
# the sweep: 2 methods x 2 seeds on digits (folders 0-3 as a multirun numbers them), the same start model
METHODS = [["experiment=smoke"], ["pruner=greedy_thesis", "pruner.finetune_epochs=1"]]
SEEDS = (0, 1)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def compose_run(overrides: list[str], run_dir: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    run(cfg, run_dir)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four real runs (uniform and greedy_thesis on digits, seeds 0 and 1) as a multirun folder, and their report."""
    root = tmp_path_factory.mktemp("report")
    for k, (method, seed) in enumerate((m, s) for m in METHODS for s in SEEDS):
        compose_run([*method, *HW, f"seed={seed}"], root / "multirun" / str(k))
    out = root / "out"
    assert report.main([str(root / "multirun"), "--out", str(out)]) == 0
    return root / "multirun", out


def expected(multirun: Path) -> dict[tuple[str, str, str], dict]:
    """(method, phase, step) -> n, mean and sample std over seeds of value and the cost columns, from the four
    points.csv files: per run the selected point of a step where one is marked (greedy's children), else the most
    accurate; the dense start model, in every run, once per seed."""
    per: dict[tuple, dict] = {}
    for k, seed in enumerate(s for _ in METHODS for s in SEEDS):
        groups: dict[tuple, list] = {}
        points = read_points(multirun / str(k) / "points.csv")
        for r in points:
            phase = r.get("phase") or ""
            once = len({q["step"] for q in points if (q["method"], q.get("phase")) == (r["method"], r.get("phase"))}) == 1
            # a search's winner, whatever step it ended at (uniform's final points, one per ratio, keep theirs)
            step = "end" if phase in ("final", "scratch_control") and once else r["step"]
            groups.setdefault((r["method"], phase, step), []).append(r)
        for key, rs in groups.items():
            chosen = [r for r in rs if r.get("selected") == "True"] or rs
            per.setdefault(key, {}).setdefault(seed, max(chosen, key=lambda r: float(r["value"])))
    out = {}
    for key, by_seed in per.items():
        rs = list(by_seed.values())
        e = {"n": len(rs), "metric": rs[0]["metric"]}
        for col in ("value", *report.COSTS):
            xs = [float(r[col]) for r in rs]
            e[col] = (statistics.fmean(xs), statistics.stdev(xs))
        out[key] = e
    return out


def test_table_matches_the_points(sweep):
    multirun, out = sweep
    want = expected(multirun)
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["phase"], r["step"]) for r in rows} == set(want)
    assert {m for m, _, _ in want} == {"dense", "uniform", "greedy_thesis"}
    assert any(p == "child" for _, p, _ in want) and any(p == "final" for _, p, _ in want)
    for r in rows:
        e = want[(r["method"], r["phase"], r["step"])]
        assert int(r["n"]) == 2 and r["metric"] == e["metric"] == "accuracy"
        assert r["configuration"] == ""  # the runs of a method differ by seed only; dense by the pruner only
        for col in ("value", *report.COSTS):
            assert float(r[f"{col}_mean"]) == pytest.approx(e[col][0], rel=1e-9, abs=1e-12), col
            assert float(r[f"{col}_std"]) == pytest.approx(e[col][1], rel=1e-9, abs=1e-12), col
    for x in ("macs", "effective_macs", "latency_ms", "train_samples"):
        png = out / f"pareto_{x}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (out / "table.md").read_text()
    page = (out / "index.html").read_text()
    for e in want.values():
        mean, std = e["value"]
        cell = f"{mean:.4g} ± {std:.4g}"
        assert cell in md and f"<td>{cell}</td>" in page
        assert f"<td>{e['macs'][0]:,.0f} ± {e['macs'][1]:,.0f}</td>" in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert str(multirun / "0") in page and str(multirun / "1") in page  # the runs read
    with open(out / "best.csv", newline="") as f:
        best = list(csv.DictReader(f))
    assert [(b["method"], b["n"]) for b in best] == [("dense", "2"), ("greedy_thesis", "2"), ("uniform", "2")]


def test_configuration_is_what_differs_besides_the_seed(tmp_path, sweep):
    """A third run with another pruner setting is its own configuration; the dense model is shared by all."""
    multirun, _ = sweep
    compose_run(["experiment=smoke", *HW, "seed=0", "pruner.ratios=[0.25]"], tmp_path / "other")
    _, best = report.tables(report.load_runs([multirun, tmp_path / "other"]))
    got = {(r["method"], r["configuration"]): r["n"] for r in best}
    assert got == {("dense", ""): 2, ("greedy_thesis", ""): 2, ("uniform", "pruner.ratios=[0.5]"): 2,
                   ("uniform", "pruner.ratios=[0.25]"): 1}


def test_cli_errors_are_one_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "inferno.report", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"inferno.report: error: {tmp_path / 'missing'}: no such directory"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"inferno.report: error: {tmp_path / 'empty'}: no points.csv under it\n"
    assert not (tmp_path / "r").exists()


def test_index_html_in_headless_chromium(sweep, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    from PIL import Image

    multirun, out = sweep
    url = (out / "index.html").resolve().as_uri()
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    want = expected(multirun)
    for (method, _, _), e in want.items():  # every table row rendered
        mean, std = e["value"]
        assert f"<td>{method}</td>" in dom and f"<td>{mean:.4g} ± {std:.4g}</td>" in dom
    assert dom.count('<img alt="pareto_') == 4 and dom.count('src="data:image/png;base64,') == 4
    # a screenshot, and one of the same page with the images' data emptied: the plots' axes frames (dark lines
    # >= 120 px long; the tables' borders are light grey, text is short) are there, and only with the images
    control = tmp_path / "control.html"
    page = (out / "index.html").read_text()
    control.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page))
    frames = {}
    for name, target in (("report", url), ("control", control.resolve().as_uri())):
        shot = tmp_path / f"{name}.png"
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", target], capture_output=True,
                       timeout=120, check=False)
        assert shot.is_file(), "chromium wrote no screenshot"
        frames[name] = long_dark_lines(np.asarray(Image.open(shot).convert("L")) < 180, 120)
    assert frames["control"] == (0, 0), frames
    # 4 plots in a 2 x 2 grid: at least a top and a bottom edge per grid row, a left and a right per grid column
    assert frames["report"][0] >= 4 and frames["report"][1] >= 4, frames


def long_dark_lines(dark, length: int) -> tuple[int, int]:
    """(rows, columns) of a boolean image holding a run of at least ``length`` True pixels."""
    def count(a):
        cs = np.concatenate([np.zeros((a.shape[0], 1), int), np.cumsum(a, axis=1)], axis=1)
        return int(((cs[:, length:] - cs[:, :-length]) == length).any(axis=1).sum())

    return count(dark), count(dark.T)
