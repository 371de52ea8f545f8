"""Scale-out on the tools the field uses: a multirun through the submitit launcher (the SLURM code path, run as
local processes) gives each job the points the same run gives in this process; a greedy search whose children
are fitted in worker processes (``pruner.parallel_children``) ends with the serial run's points and weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inferno.run import run
from inferno.search.loop import key_digest
from inferno.tracking import read_points

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = ["hardware.num_threads=1", "logger=none", "hardware.progress_bar=false"]
SMOKE = ["experiment=smoke", "hardware.limit_batches=2", "hardware.latency_repeats=1",
         "hardware.latency_batch_size=8", *ONE_THREAD]
# columns that measure the machine (or the wall clock), not what the run computed
UNCOMPARED = {"wall_s", "latency_ms", "peak_mem_mb"}


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in rows]


def test_submitit_local_sweep_runs_two_jobs_like_single_runs(compose_cfg, tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "inferno", "-m", "hydra/launcher=submitit_local", *SMOKE, "seed=0,1",
                        f"hydra.sweep.dir={sweep}", f"paths.output_dir={tmp_path}"],
                       check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr  # the submitit launcher ran it, not the basic one
    jobs = sorted(p.parent for p in sweep.glob("*/points.csv"))
    assert [p.name for p in jobs] == ["0", "1"]
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2, "each job ran in its own submitit process"
    seeds = [json.loads((j / "summary.json").read_text())["config"]["seed"] for j in jobs]
    assert seeds == [0, 1]
    # each job's points are those of the same run in this process (same code, seed, one thread)
    for job, seed in zip(jobs, seeds):
        run(compose_cfg(*SMOKE, f"seed={seed}"), tmp_path / f"here{seed}")
        assert comparable(read_points(job / "points.csv")) == comparable(read_points(tmp_path / f"here{seed}" / "points.csv"))
    a, b = (read_points(j / "points.csv") for j in jobs)
    assert [p["value"] for p in a] != [p["value"] for p in b], "two seeds, two different runs"


def test_slurm_launcher_config_extends_the_plugin(compose_cfg):
    cfg = compose_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 240, 1, 1)
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120  # the plugin's keys are all there
    plain = compose_cfg("hydra/launcher=submitit_slurm", return_hydra_config=True)
    assert plain.hydra.launcher.timeout_min == 60  # the plugin's own config stays selectable


SMALL = ["task=digits", "model=microcnn", "model.stages=2", "model.depth=2", "model.base_channels=8",
         "hardware.limit_batches=2", "hardware.latency_repeats=1", "hardware.latency_batch_size=8",
         "train.dense_epochs=1", *ONE_THREAD]
GREEDY = [*SMALL, "pruner=greedy_layerwise", "pruner.moves=[drop_stage,drop_block,narrow]", "pruner.budget.macs=0.3",
          "pruner.final_epochs=1", "pruner.scratch_epochs=1"]
THESIS = [*SMALL, "pruner=greedy_thesis", "pruner.budget.macs=0.45", "pruner.finetune_epochs=1", "pruner.score_epochs=1",
          "pruner.final_epochs=1"]


@pytest.mark.parametrize("pruner", [GREEDY, pytest.param(THESIS, marks=pytest.mark.slow)], ids=["layerwise", "thesis"])
def test_parallel_children_equal_the_serial_search(compose_cfg, tmp_path, pruner):
    runs = {}
    for k in (1, 2):
        cfg = compose_cfg(*pruner, f"pruner.parallel_children={k}", f"paths.state_dir={tmp_path / f'state{k}'}")
        run(cfg, tmp_path / f"p{k}")
        runs[k] = read_points(tmp_path / f"p{k}" / "points.csv")
    serial, parallel = runs[1], runs[2]
    children = [p for p in serial if "child" in p.get("phase", "")]
    assert len({p["step"] for p in children}) >= 2, "the budget must take 2+ steps with several children each"
    assert comparable(parallel) == comparable(serial)
    final = "greedy_final" if pruner is GREEDY else "greedy_thesis_final"
    a, b = (load_file(tmp_path / f"p{k}" / f"{final}.safetensors") for k in (1, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the worker count does not change what a search computes: one saved state serves both
    keys = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("state*/*/key.json"))]
    assert len(keys) == 2 and key_digest(keys[0]) == key_digest(keys[1])


def test_parallel_children_out_of_range_is_one_line(compose_cfg, tmp_path):
    from inferno.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^pruner.parallel_children: 0"):
        run(compose_cfg(*GREEDY, "pruner.parallel_children=0"), tmp_path)
