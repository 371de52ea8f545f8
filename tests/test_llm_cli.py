"""The LLM track through the CLI and the Hydra configs: the contract command end to end, one-line errors,
every method / pattern / family through its config, commonsense tasks, save=true export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferno.errors import ConfigError
from inferno.run import RunContext, build, run, validate
from inferno.tracking import Tracker, read_points

ROOT = Path(__file__).resolve().parents[1]
FAST = ("logger=none", "hardware.progress_bar=false", "hardware.latency_repeats=2")
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 60


def cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "inferno", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def text_task(tmp_path):
    """Overrides for a small wikitext2-style task on a temporary text file, calibrated on it."""
    p = tmp_path / "corpus.raw"
    p.write_text(TEXT)
    return (f"task.path={p}", "task.limit=4", "task.seqlen=64", "pruner.calibration=task", "pruner.nsamples=4",
            "pruner.seqlen=64")


def run_points(compose_cfg, run_dir, *overrides):
    run(compose_cfg(*overrides, *FAST), run_dir)
    return read_points(Path(run_dir) / "points.csv")


def test_contract_command_end_to_end(shared_data, tmp_path):
    r = cli("model=tiny_llama", "task=wikitext2", "pruner=wanda", "pruner.sparsity=0.5", "task.limit=8",
            "pruner.nsamples=8", "pruner.seqlen=64", *FAST, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_points(tmp_path / "points.csv")
    assert [row["method"] for row in rows] == ["dense", "wanda"]
    dense, wanda = rows
    assert float(wanda["sparsity"]) == pytest.approx(0.5, abs=1e-6) and float(dense["sparsity"]) == 0.0
    assert wanda["metric"] == "perplexity" and float(wanda["value"]) > 1 and wanda["train_samples"] == "0"
    assert wanda["calibration"] == "shakespeare" and int(wanda["calib_tokens"]) == 8 * 64
    assert float(wanda["min_layer_sparsity"]) == float(wanda["max_layer_sparsity"]) == 0.5
    report = json.loads((tmp_path / "sparsity.json").read_text())
    assert len(report["layers"]) == 2 * 7 and report["achieved_sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "curve.png").is_file()


def test_bad_sparsity_fails_with_one_line(tmp_path):
    r = cli("model=tiny_llama", "task=wikitext2", "pruner=wanda", "pruner.sparsity=1.5", "logger=none",
            f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "error: pruner.sparsity must be in [0, 1), got 1.5"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "overrides, line",
    [
        (("model=tiny_llama", "pruner=sparsegpt", "pruner.pattern=3:5"),
         "pruner.sparsity=0.5 conflicts with pruner.pattern='3:5'"),
        (("model=microcnn", "pruner=wanda"), "model: microcnn is a vision model and cannot run task wikitext2"),
    ],
)
def test_bad_pairs_fail_before_any_data_is_read(compose_cfg, tmp_path, overrides, line):
    """What ``python -m inferno`` prints as ``error: <message>`` (exit 2), as the CLI test above checks."""
    with pytest.raises(ConfigError) as e:
        run(compose_cfg("task=wikitext2", "task.path=/nonexistent.raw", *overrides, "logger=none"), tmp_path)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)
    assert not (tmp_path / "points.csv").exists()


def test_config_errors_name_the_key(compose_cfg):
    for overrides, key in [
        (("pruner=wanda", "pruner.pattern=2-4"), "pruner.pattern"),
        (("pruner=owl", "pruner.pattern=2:4"), "pruner.pattern"),
        (("pruner=wanda", "pruner.calibration=c4"), "pruner.calibration"),
        (("pruner=wanda", "pruner.nsamples=0"), "pruner.nsamples"),
        (("pruner=inferno_task", "pruner.score=l3"), "pruner.score"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            build(compose_cfg("model=tiny_llama", "task=wikitext2", *overrides), "pruner")
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model\.path"):
        build(compose_cfg("model=bench_lm", "task=wikitext2", "model.path=/nonexistent/bench"), "model")
    with pytest.raises(ConfigError, match=r"model\.path"):
        build(compose_cfg("model=hf_causal_lm", "task=wikitext2"), "model")
    validate(compose_cfg("model=tiny_gpt2", "task=boolq", "pruner=inferno_task"))


def test_help_lists_the_llm_options():
    out = cli("--help").stdout
    for option in ("tiny_llama", "tiny_gpt2", "hf_causal_lm", "bench_lm", "wikitext2", "commonsense", "boolq", "piqa",
                   "arc_easy", "arc_challenge", "magnitude", "wanda", "sparsegpt", "owl", "inferno_task"):
        assert option in out, option


@pytest.mark.parametrize(
    "pruner, extra, target",
    [
        ("magnitude", (), 0.5),
        ("wanda", ("pruner.pattern=2:4",), 0.5),
        ("sparsegpt", ("pruner.pattern=4:8",), 0.5),
        ("sparsegpt", ("pruner.sparsity=0.7",), 0.7),
        ("owl", ("pruner.sparsity=0.7",), 0.7),
        ("inferno_task", (), 0.5),
        ("inferno_task", ("pruner.score=l2", "pruner.generate=8"), 0.5),
    ],
)
def test_every_method_through_its_config(compose_cfg, tmp_path, text_task, pruner, extra, target):
    rows = run_points(compose_cfg, tmp_path, "model=tiny_llama", "task=wikitext2", f"pruner={pruner}", *text_task, *extra)
    assert [r["method"] for r in rows] == ["dense", pruner]
    row = rows[1]
    # per layer for uniform methods; on average for OWL and skewness (whole-model zero fraction: OWL's layer
    # targets are met per row, to within half a weight of a 64-wide row)
    assert float(row["sparsity"]) == pytest.approx(target, abs=1e-3 if pruner != "owl" else 1 / 128)
    if pruner in ("magnitude", "wanda", "sparsegpt") or row["variant"] == "l2":
        assert float(row["min_layer_sparsity"]) == pytest.approx(target, abs=1e-3)
        assert float(row["max_layer_sparsity"]) == pytest.approx(target, abs=1e-3)
    if pruner == "owl":
        assert float(row["min_layer_sparsity"]) < float(row["max_layer_sparsity"])
    seqlen = 64 + (8 if "pruner.generate=8" in extra else 0)
    assert int(row["calib_tokens"]) == (0 if pruner == "magnitude" else 4 * seqlen)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "opt", "gpt2"])
def test_tiny_families_prune_from_the_cli_configs(compose_cfg, tmp_path, text_task, family):
    rows = run_points(compose_cfg, tmp_path, f"model=tiny_{family}", "task=wikitext2", "pruner=wanda", *text_task)
    assert rows[1]["model"] == f"tiny_{family}" and float(rows[1]["sparsity"]) == pytest.approx(0.5, abs=1e-6)


def test_commonsense_task_with_task_calibration(compose_cfg, tmp_path):
    recs = [{"instruction": f"Please choose the correct solution to the question: how to do thing {i}?\n\n"
             f"Solution1: carefully step {i}\n\nSolution2: quickly skip it\n\nAnswer format: solution1/solution2",
             "input": "", "output": "", "answer": f"solution{i % 2 + 1}"} for i in range(40)]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(recs))
    rows = run_points(compose_cfg, tmp_path / "run", "model=tiny_llama", "task=commonsense", f"task.path={path}",
                      "task.limit=10", "pruner=inferno_task", "pruner.nsamples=4", "pruner.seqlen=64")
    _dense, pruned = rows
    assert pruned["method"] == "inferno_task" and pruned["metric"] == "acc" and pruned["calibration"] == "task"
    assert pruned["variant"] == "skewness" and pruned["n_examples"] == "10"
    for r in rows:
        assert 0 <= float(r["value"]) <= 1 and 0 <= float(r["acc_norm"]) <= 1 and float(r["task_nll"]) > 0


def test_save_true_reloads_with_identical_logits(compose_cfg, tmp_path, text_task):
    from transformers import AutoModelForCausalLM

    cfg = compose_cfg("model=tiny_llama", "task=wikitext2", "pruner=sparsegpt", "save=true", *text_task, *FAST)
    assert cfg.pruner.save is True
    pruner, net, task = build(cfg, "pruner"), build(cfg, "model"), build(cfg, "task")
    task.setup()
    ctx = RunContext(cfg=cfg, net=net, task=task, trainers=None, tracker=Tracker(tmp_path), train=None, run_dir=tmp_path)
    pruner.run(ctx)
    out = tmp_path / "model"
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["mean_layer_sparsity"] == pytest.approx(0.5, abs=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, reloaded(input_ids=ids).logits)
