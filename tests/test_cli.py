"""The CLI contract: composition, --help, bad values, outputs of a run, multirun, loggers."""

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from inferno.config import build, build_node, config_message
from inferno.errors import ConfigError
from inferno.run import run, validate
from inferno.tracking import COLUMNS, read_points

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("model", "task", "pruner", "hardware", "logger", "paths")


def cli(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "inferno", *args], check=False, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_composed_config_has_every_group(compose_cfg):
    cfg = compose_cfg()
    for g in GROUPS:
        assert g in cfg and cfg[g] is not None, g
    assert (cfg.model.name, cfg.task.name, cfg.pruner.name, cfg.hardware.accelerator) == (
        "microcnn", "digits", "greedy_vs_random", "cpu")
    assert [k for k, v in cfg.pruner.methods.items() if v] == ["greedy_layerwise", "random_sampling"]
    assert cfg.pruner.methods.random_sampling.budget == cfg.pruner.budget
    assert list(cfg.logger) == ["wandb"] and cfg.logger.wandb.mode == "offline"
    assert cfg.model.in_channels == cfg.task.in_channels == 1
    cfg = compose_cfg("model=resnet20", "task=mnist", "hardware=gpu", "logger=csv", "experiment=smoke")
    assert cfg.model.name == "resnet20" and cfg.task.data_dir == cfg.paths.data_dir
    assert cfg.hardware.accelerator == "gpu" and cfg.hardware.latency_batch_size == 256
    assert cfg.pruner.ratios == [0.5] and cfg.logger.csv._target_.endswith("CSVLogger")
    assert not compose_cfg("logger=none").logger


def test_unknown_model_names_group_and_options(compose_cfg):
    with pytest.raises(HydraException) as e:
        compose_cfg("model=vgg99")
    msg = str(e.value)
    assert "model/vgg99" in msg and "microcnn" in msg and "resnet20" in msg


def test_unknown_key_is_refused(compose_cfg):
    with pytest.raises(HydraException, match="pruner.ratioz"):
        compose_cfg("pruner.ratioz=[0.5]")


def test_incompatible_model_task_pair_one_line(compose_cfg):
    cfg = compose_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.task.kind, cfg.task.name = "causal_lm", "wikitext2"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith("model: microcnn is a vision model") and "\n" not in str(e.value)


def test_help_lists_every_group():
    out = cli("--help").stdout
    for g in GROUPS + ("experiment",):
        assert f"{g}:" in out, g
    for option in ("microcnn", "resnet20", "digits", "mnist", "uniform", "greedy_layerwise", "random_sampling",
                   "supernet", "compare", "greedy_vs_random", "cpu", "gpu", "wandb", "csv", "none", "thesis_cnn"):
        assert option in out, option
    for example in help_examples():  # the footer (each line tested by test_help_example_composes)
        assert example in out, example


def test_cfg_job_prints_composition():
    out = cli("--cfg", "job", "model=resnet20").stdout
    assert "_target_: inferno.models.resnet20.ResNet20" in out and "name: digits" in out


def test_bad_ratio_fails_with_one_line(tmp_path):
    r = cli("pruner=uniform", "pruner.ratios=[0.5,1.5]", "logger=none", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: pruner.ratios: ratio 1.5 is outside [0, 1)"
    assert "Traceback" not in r.stderr


def test_builder_value_error_becomes_config_error(compose_cfg):
    cfg = compose_cfg("model.stages=0")
    with pytest.raises(ConfigError) as e:
        build(cfg, "model")
    msg = str(e.value)
    assert msg.startswith("model: MicroCNN needs stages >= 1") and "\n" not in msg
    # a builder's message that does not name the group gets the group's name in front, on one line
    node = OmegaConf.create({"_target_": "fractions.Fraction", "_args_": ["half"]})
    with pytest.raises(ConfigError, match=r"^model: Invalid literal for Fraction: 'half'$"):
        build_node(node, "model")
    assert config_message("pruner", ValueError("pruner.budget: bad\n  value")) == "pruner.budget: bad value"


def test_builder_value_error_fails_with_one_line(tmp_path):
    r = cli("model.stages=0", "logger=none", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model: MicroCNN needs stages >= 1, one depth >= 1 per stage and width >= 1; "
        "got stages=0, depth=2, width=2")
    assert "Traceback" not in r.stderr and "InstantiationException" not in r.stderr


@pytest.mark.parametrize("args, key", [(("pruner.nonexistent=1",), "pruner.nonexistent"), (("model=nope",), "model: unknown option")])
def test_composition_errors_have_no_traceback(args, key):
    # Hydra's composition errors, read by inferno.__main__.cli: one line, exit 2 (model=nope lists the options)
    r = cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: {key}"), r.stderr


def help_examples() -> list[str]:
    footer = OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.help.footer
    return [line.split("#")[0].strip() for line in footer.splitlines() if line.strip().startswith("python -m inferno")]


def test_help_has_examples():
    examples = help_examples()
    assert len(examples) >= 8
    for needed in ("pruner=greedy_thesis", "pruner=grid", "pruner=uniform pruner.ratios=[0.5]", "experiment=thesis_cnn"):
        assert any(needed in e for e in examples), needed
    assert any(e.split()[3:4] == ["-m"] for e in examples)  # a multirun


@pytest.mark.parametrize("example", help_examples())
def test_help_example_composes(compose_cfg, example):
    """Every example line of --help's footer composes (what `<line> --cfg job` does; a multirun line once per
    combination of its sweeps), passes validate and builds its pruner."""
    args = shlex.split(example)[3:]
    if args[-2:] == ["--cfg", "job"]:
        args = args[:-2]
    multirun = args[:1] in (["-m"], ["--multirun"])
    args = args[1:] if multirun else args
    assert not any(a.startswith("-") for a in args), f"unhandled flag in {example!r}"
    for a in args:
        if a.startswith("pruner=") and not (ROOT / "conf" / "pruner" / f"{a[7:]}.yaml").exists():
            pytest.skip(f"conf/pruner/{a[7:]}.yaml does not exist yet (being added)")
    choices = []
    for o in OverridesParser.create().parse_overrides(args):
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{o.get_key_element()}={v}" for v in values])
    assert multirun == any(len(c) > 1 for c in choices), "sweeps (a,b) need -m, and -m lines should sweep"
    for overrides in itertools.product(*choices):
        cfg = compose_cfg(*overrides)
        validate(cfg)
        assert build(cfg, "pruner") is not None


def test_missing_data_file_names_key(tmp_path):
    r = cli("task=mnist", "logger=none", f"hydra.run.dir={tmp_path}", env={"INFERNO_DATA": str(tmp_path / "nowhere")})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: paths.data_dir: MNIST file")


@pytest.mark.slow
def test_default_experiment_end_to_end(tmp_path):
    """`python -m inferno` with no arguments (but the run dir): greedy vs random sampling on digits,
    all outputs, the W&B offline run included."""
    r = cli(f"hydra.run.dir={tmp_path}", "hardware.progress_bar=false", f"paths.state_dir={tmp_path / 'state'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_points(tmp_path / "points.csv")
    assert list(rows[0])[: len(COLUMNS)] == list(COLUMNS)
    assert rows[0]["method"] == "dense" and float(rows[0]["value"]) > 0.9  # the trained MicroCNN on digits
    greedy = [r for r in rows if r["method"] == "greedy_layerwise"]
    final = next(r for r in greedy if r["phase"] == "final")
    assert int(final["macs"]) <= 0.5 * int(rows[0]["macs"]) and float(final["value"]) > 0.8
    rnd = [r for r in rows if r["method"] == "random_sampling"]
    assert rnd and int(rnd[-1]["train_samples"]) <= int(final["search_samples"])  # matched to greedy's search
    assert all(int(r["macs"]) <= 0.5 * int(rows[0]["macs"]) for r in rnd)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"dense", "greedy_layerwise", "random_sampling"} <= set(summary["best"])
    assert summary["config"]["model"]["name"] == "microcnn"
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_run_in_process_with_csv_logger(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", "logger=csv", "hardware.limit_batches=3")
    objective = run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert len(rows) == 2 and rows[1]["method"] == "uniform"
    assert objective == max(float(r["value"]) for r in rows if r["method"] == "uniform")
    # the model pruned at 0.5 has the params of the half-width network (see test_models_cost)
    assert int(rows[1]["params"]) < int(rows[0]["params"]) / 3
    metrics = list((tmp_path / "lightning_csv").rglob("metrics.csv"))
    assert metrics and "uniform/value" in metrics[0].read_text()


def test_multirun_sweep(tmp_path):
    r = cli("-m", "experiment=smoke", "logger=none", "hardware.limit_batches=2", "pruner.importance=l1,l2", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    points = sorted(tmp_path.glob("*/points.csv"))
    assert len(points) == 2
    cfgs = [json.loads((p.parent / "summary.json").read_text())["config"]["pruner"]["importance"] for p in points]
    assert sorted(cfgs) == ["l1", "l2"]


def test_two_runs_in_one_process_get_two_wandb_runs(compose_cfg, tmp_path):
    for i in range(2):
        run(compose_cfg("experiment=smoke", "logger=wandb", "hardware.limit_batches=2"), tmp_path / str(i))
    for i in range(2):
        assert len(list((tmp_path / str(i) / "wandb").glob("offline-run-*"))) == 1
