"""The fault battery: bad input ends in one line naming the key (exit 2, no traceback, before any training and
without touching an earlier run's files); a points.csv cut by a crash and a damaged or tampered search state are
handled on rerun; weights are read only through safetensors (or ``torch.load(weights_only=True)``).

The bad-input cases run through the real entry point, ``inferno.__main__.cli``, in this process (sys.argv
patched, Hydra's global state cleared between calls): a subprocess costs ~6-10 s of imports here. Three of
them also run as real ``python -m inferno`` processes to show that the two paths print the same."""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import save_file

import inferno.__main__ as entry
from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.run import run
from inferno.search import loop
from inferno.search.loop import STATE_CLASSES, SearchInterrupted, StateStore
from inferno.tasks.lm import check_model_folder
from inferno.tracking import Tracker, read_points
from inferno.training import Trainers

ROOT = Path(__file__).resolve().parents[1]
# columns that measure the machine or say where a point came from, not what the search computed
UNCOMPARED = {"wall_s", "latency_ms", "peak_mem_mb", "resumed"}
EARLIER = "method,step,value\nuniform,1,0.9\n"  # an earlier run's points.csv, which a refused run must not touch


@dataclass
class Result:
    code: int
    err: str
    out: str
    seconds: float


def one_line_error(r: Result) -> str:
    """The one stderr line of a refused run (exit 2, ``error: ...``, no traceback)."""
    assert r.code == 2, (r.code, r.err[-3000:])
    assert "Traceback" not in r.err, r.err[-3000:]
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def key_of(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


@pytest.fixture
def inferno(monkeypatch, capfd, tmp_path):
    """``inferno ARGS`` through :func:`inferno.__main__.cli` in this process: (exit code, stderr, stdout, seconds).
    Runs get ``logger=none``, one thread, no progress bar, outputs under ``tmp_path`` and (unless they pick a
    pruner) ``pruner=uniform``; the case's own value wins for any of these keys. Any training started is
    recorded in ``inferno.fits``."""
    fits = []
    real_fit = Trainers.fit

    def watched_fit(self, *a, **kw):
        fits.append(a)
        return real_fit(self, *a, **kw)

    monkeypatch.setattr(Trainers, "fit", watched_fit)

    def call(*args: str, run_dir: Path | None = None) -> Result:
        run_dir = run_dir or tmp_path / "run"
        base = ["logger=none", "hardware.num_threads=1", "hardware.progress_bar=false", f"hydra.run.dir={run_dir}",
                f"paths.output_dir={tmp_path / 'outputs'}", f"paths.state_dir={tmp_path / 'state'}"]
        if not any(a.startswith(("pruner=", "experiment=")) for a in args):
            base.insert(0, "pruner=uniform")
        keys = {key_of(a) for a in args}
        monkeypatch.setattr(sys, "argv", ["inferno", *(b for b in base if key_of(b) not in keys), *args])
        # cli() sets HYDRA_FULL_ERROR=1 (Hydra then raises its errors) unless it is 1 already (then Hydra's own
        # report is shown): "0" here, and the variable's original state comes back after the test
        monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
        GlobalHydra.instance().clear()
        capfd.readouterr()
        t = time.perf_counter()
        code = 0
        try:
            entry.cli()
        except SystemExit as e:
            code = e.code
        finally:
            GlobalHydra.instance().clear()
        seconds = time.perf_counter() - t
        out = capfd.readouterr()
        return Result(code, out.err, out.out, seconds)

    call.fits = fits
    return call


# ---------------------------------------------------------------- files the bad-input cases read


def tiny_weights(path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in MicroCNN(2, 1, 1, 8).state_dict().items()}, str(path))
    return path


def hf_folder(path: Path, weights: bool = True, tokenizer: bool = True, bin_only: bool = False) -> Path:
    """A model folder as ``check_model_folder`` sees it (nothing in it is loaded before the check refuses it)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    if bin_only:
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be read")
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault_files")
    (d / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    data = tiny_weights(d / "whole.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short
    (d / "bad" / "mnist").mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / "bad" / "mnist" / name).write_bytes(b"not gzip at all")
    (d / "cut" / "mnist").mkdir(parents=True)
    for name, header in (("t10k-images-idx3-ubyte.gz", 16), ("t10k-labels-idx1-ubyte.gz", 8)):
        whole = gzip.compress(bytes(header) + bytes(range(256)) * 10)
        (d / "cut" / "mnist" / name).write_bytes(whole[: len(whole) // 2])  # gzip cut mid-stream
    (d / "bad.json").write_text('[{"instruction": "Is the sky blue?", "answer": ')
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    hf_folder(d / "no_weights", weights=False)
    hf_folder(d / "no_tokenizer", tokenizer=False)
    hf_folder(d / "bin_only", weights=False, bin_only=True)
    garbage = hf_folder(d / "garbage_weights")
    (garbage / "model.safetensors").write_bytes(b"garbage")
    return d


LLM = ("model=tiny_llama", "task=wikitext2", "pruner=wanda")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: hardware=gpu is valid here")

# name -> (args, what the line starts with after "error: ", substrings it must hold too[, pytest marks]);
# {files}: the files fixture's folder
CASES = {
    # unknown options, every config group
    "model-option": (["model=vgg99"], "model: unknown option 'vgg99'", ["allowed:", "microcnn", "resnet20"]),
    "task-option": (["task=imagenet"], "task: unknown option 'imagenet'", ["allowed:", "digits", "mnist"]),
    "pruner-option": (["pruner=nope"], "pruner: unknown option 'nope'", ["allowed:", "uniform", "wanda"]),
    "hardware-option": (["hardware=tpu"], "hardware: unknown option 'tpu'", ["allowed: cpu, gpu"]),
    "hardware-ddp-removed": (["hardware=ddp"], "hardware: unknown option 'ddp'", ["allowed: cpu, gpu"]),
    "logger-option": (["logger=tensorboardx"], "logger: unknown option 'tensorboardx'",
                      ["allowed: csv, mlflow, none, tensorboard, wandb"]),
    "logger-option-in-list": (["logger=[csv,nope]"], "logger: unknown option 'nope'", ["allowed:", "mlflow"]),
    "experiment-option": (["experiment=nope"], "experiment: unknown option 'nope'", ["allowed:", "smoke"]),
    "paths-option": (["paths=nope"], "paths: unknown option 'nope'", ["allowed: default"]),
    # unknown keys
    "pruner-key": (["pruner.ratioz=[0.5]"], "pruner.ratioz: unknown key", ["allowed:", "ratios", "+pruner.ratioz="]),
    "train-key": (["train.lrr=0.1"], "train.lrr: unknown key", ["allowed:", "lr", "dense_epochs"]),
    "hardware-key": (["hardware.gpus=1"], "hardware.gpus: unknown key", ["allowed:", "devices", "accelerator"]),
    "malformed-override": (["pruner.ratios=[0.5"], "override 'pruner.ratios=[0.5':", ["[0.5"]),
    # unknown choice values
    "importance": (["pruner.importance=l9"], "pruner.importance: unknown importance 'l9'", ["allowed: l1, l2"]),
    "optimizer": (["train.optimizer=adam"], "train.optimizer: unknown optimizer 'adam'", ["allowed: adamw, sgd"]),
    "schedule": (["+train.schedule=cosine"], "train.schedule: unknown schedule 'cosine'", ["allowed: onecycle, constant"]),
    "precision": (["hardware.precision=8-true"], "hardware.precision: unknown precision '8-true'", ["32-true", "bf16-mixed"]),
    "wandb-mode": (["logger=wandb", "logger.wandb.mode=sideways"], "logger.wandb.mode: unknown mode 'sideways'",
                   ["offline", "online"]),
    "llm-calibration": ([*LLM, "pruner.calibration=nope"], "pruner.calibration", ["wikitext2", "a text file"]),
    # out of range
    "ratio": (["pruner.ratios=[0.5,1.5]"], "pruner.ratios: ratio 1.5 is outside [0, 1)", []),
    "sparsity": ([*LLM, "pruner.sparsity=1.5"], "pruner.sparsity", ["[0, 1)", "1.5"]),
    "nm-pattern": ([*LLM, "pruner.pattern=5:4"], "pruner.pattern", ["N:M", "2:4"]),
    "lr-negative": (["train.lr=-1"], "train.lr: -1 must be a number in (0, inf)", []),
    "momentum": (["train.momentum=1.5"], "train.momentum: 1.5 must be a number in [0, 1)", []),
    "dense-epochs-negative": (["train.dense_epochs=-1"], "train.dense_epochs: -1", ["whole number of epochs >= 0"]),
    "dense-epochs-fraction": (["train.dense_epochs=1.5"], "train.dense_epochs: 1.5", ["fraction below 1"]),
    "finetune-epochs": (["pruner.finetune_epochs=-1"], "pruner.finetune_epochs: -1", ["epochs >= 0"]),
    "iterative-steps": (["pruner.iterative_steps=0"], "pruner.iterative_steps: 0", ["integer >= 1"]),
    "latency-repeats": (["hardware.latency_repeats=0"], "hardware.latency_repeats: 0", ["integer >= 1"]),
    "num-threads": (["hardware.num_threads=0"], "hardware.num_threads: 0", ["integer >= 1 or null"]),
    "budget-negative": (["pruner=random_sampling", "pruner.budget.macs=-1"], "pruner.budget.macs: -1", ["(0, inf)"]),
    "compare-budget": (["pruner=compare", "pruner.budget.macs=-1"], "pruner.budget.macs: -1", ["(0, inf)"]),
    "max-samples": (["pruner=random_sampling", "pruner.max_samples=0"], "pruner.max_samples: 0", ["integer >= 1"]),
    "stop-after": (["pruner=random_sampling", "pruner.stop_after=-1"], "pruner.stop_after: -1", ["integer >= 0"]),
    "num-classes": (["model.num_classes=3"], "model.num_classes: the head has 3 classes", ["10 labels"]),
    "stages": (["model.stages=0"], "model: MicroCNN needs stages >= 1", ["got stages=0"]),
    # wrong types (a string where a number or a boolean goes)
    "lr-string": (["train.lr=abc"], "train.lr: 'abc' must be a number", []),
    "width-string": (["model.width=abc"], "model.width: 'abc' must be an integer", []),
    "depth-string": (["model.depth=[1,x]"], "model.depth: [1, 'x'] must be an integer or one integer per stage", []),
    "seed-string": (["seed=abc"], "seed: 'abc' must be an integer >= 0", []),
    "limit-batches-string": (["hardware.limit_batches=abc"], "hardware.limit_batches: 'abc'", ["integer >= 1 or null"]),
    "batch-size-string": (["task.batch_size=abc"], "task.batch_size: 'abc' must be an integer >= 1", []),
    "batch-size-zero": (["task.batch_size=0"], "task.batch_size: 0 must be an integer >= 1", []),
    "bool-string": (["pruner.global_pruning=maybe"], "pruner.global_pruning: 'maybe' must be true or false", []),
    "progress-bar-string": (["hardware.progress_bar=maybe"], "hardware.progress_bar: 'maybe' must be true or false", []),
    "resume-string": (["pruner=random_sampling", "pruner.resume=maybe"], "pruner.resume: 'maybe' must be true or false", []),
    "budget-scalar": (["pruner=random_sampling", "pruner.budget=5"], "pruner.budget: 5 must be a mapping", ["macs"]),
    "budget-string": (["pruner=random_sampling", "pruner.budget.macs=abc"], "pruner.budget.macs: 'abc'", ["number"]),
    # missing files
    "checkpoint-missing": (["model.checkpoint=/nonexistent/dense.safetensors"], "model.checkpoint: file /nonexistent",
                           ["not found", "safetensors"]),
    "mnist-missing": (["task=mnist", "paths.data_dir=/nonexistent"], "paths.data_dir: MNIST file /nonexistent",
                      ["not found", "INFERNO_DATA"]),
    "chars-missing": (["model=temporal_cnn", "task=shakespeare_chars", "pruner=continual", "task.path=/nonexistent"],
                      "task.path: text file /nonexistent not found", []),
    "commonsense-missing": (["model=tiny_llama", "task=commonsense", "pruner=wanda", "task.path=/nonexistent"],
                            "task.path: file /nonexistent not found", ["JSON"]),
    "model-folder-missing": (["model=hf_causal_lm", "model.path=/nonexistent", "task=wikitext2", "pruner=wanda"],
                             "model.path: /nonexistent is not a folder", []),
    "model-folder-unset": (["model=hf_causal_lm", "task=wikitext2", "pruner=wanda"], "model.path: set model.path=DIR", []),
    # malformed files
    "checkpoint-garbage": (["model.checkpoint={files}/garbage.safetensors"], "model.checkpoint: {files}/garbage.safetensors",
                           ["not a readable safetensors file"]),
    "checkpoint-truncated": (["model.checkpoint={files}/truncated.safetensors"], "model.checkpoint: {files}/truncated",
                             ["not a readable safetensors file"]),
    "mnist-not-gzip": (["task=mnist", "paths.data_dir={files}/bad"], "paths.data_dir: MNIST file {files}/bad/mnist",
                       ["not a readable gzip file"]),
    "mnist-cut": (["task=mnist", "paths.data_dir={files}/cut"], "paths.data_dir: MNIST file {files}/cut/mnist",
                  ["not a readable gzip file"]),
    "commonsense-bad-json": (["model=tiny_llama", "task=commonsense", "pruner=wanda", "task.path={files}/bad.json"],
                             "task.path: {files}/bad.json is neither JSON nor JSON lines", ["list of records"]),
    "chars-not-utf8": (["model=temporal_cnn", "task=shakespeare_chars", "pruner=continual", "task.path={files}/latin1.txt"],
                       "task.path: {files}/latin1.txt is not UTF-8 text", []),
    "model-folder-garbage-weights": (["model=hf_causal_lm", "model.path={files}/garbage_weights", "task=wikitext2",
                                      "pruner=wanda"], "model.path: {files}/garbage_weights/model.safetensors",
                                     ["not a readable safetensors file"]),
    # model folders
    "model-folder-no-weights": (["model=hf_causal_lm", "model.path={files}/no_weights", "task=wikitext2", "pruner=wanda"],
                                "model.path: no safetensors weights in {files}/no_weights", []),
    "model-folder-no-tokenizer": (["model=hf_causal_lm", "model.path={files}/no_tokenizer", "task=wikitext2",
                                   "pruner=wanda"], "model.path: no tokenizer files in {files}/no_tokenizer",
                                  ["tokenizer.json"]),
    "model-folder-bin-only": (["model=hf_causal_lm", "model.path={files}/bin_only", "task=wikitext2", "pruner=wanda"],
                              "model.path: no safetensors weights in {files}/bin_only",
                              ["pytorch_model.bin not read", "weights only through safetensors"]),
    # incompatible model / task / pruner
    "llm-pruner-on-cnn": (["pruner=wanda"], "pruner: wanda supports causal_lm models, not vision", []),
    "structured-llm-pruner-on-cnn": (["pruner=nirvana"], "pruner: nirvana supports causal_lm models, not vision", []),
    "cnn-pruner-on-llm": (["model=tiny_llama", "task=wikitext2", "pruner=uniform"],
                          "pruner: uniform supports vision models, not causal_lm", []),
    "vision-task-on-llm": (["model=tiny_llama", "task=digits", "pruner=wanda"],
                           "model: tiny_llama is a causal_lm model and cannot run task digits", ["pick a vision model"]),
    "lm-task-on-cnn": (["model=microcnn", "task=wikitext2", "pruner=wanda"],
                       "model: microcnn is a vision model and cannot run task wikitext2", ["causal_lm"]),
    "encoder-on-digits": (["model=minilm", "task=digits"], "model: minilm is a encoder model and cannot run task digits",
                          ["pick a vision model"]),
    "glue-task-on-llm": (["model=tiny_llama", "task=sst2", "pruner=encoder_structured"],
                         "model: tiny_llama is a causal_lm model and cannot run task sst2", ["pick a encoder model"]),
    # the hardware this machine does not have, multi-process training (removed)
    "gpu-group": (["hardware=gpu"], "hardware.accelerator: gpu needs a CUDA GPU", ["use hardware=cpu"], CPU_ONLY),
    "gpu-key": (["hardware.accelerator=gpu"], "hardware.accelerator: gpu needs a CUDA GPU", ["use hardware=cpu"], CPU_ONLY),
    "accelerator": (["hardware.accelerator=tpu"], "hardware.accelerator: unknown accelerator 'tpu'", ["allowed: cpu"]),
    "devices": (["hardware.devices=2"], "hardware.devices: 2", ["exactly 1 device"]),
    "ddp": (["hardware.strategy=ddp"], "hardware.strategy: 'ddp' is not supported", ["allowed: auto, single_device",
                                                                                     "multi-process training was removed"]),
}


PARAMS = [pytest.param(args, start, holds, id=name, marks=marks) for name, (args, start, holds, *marks) in CASES.items()]


def test_battery_is_large():
    assert len(CASES) >= 30
    groups = {"model", "task", "pruner", "hardware", "logger", "experiment"}
    option_cases = {c[0][0].split("=")[0] for c in CASES.values() if "unknown option" in c[1]}
    assert groups <= option_cases  # an unknown option for every group


@pytest.mark.parametrize("args, start, holds", PARAMS)
def test_bad_input_is_one_line_naming_the_key(inferno, files, tmp_path, args, start, holds):
    args = [a.format(files=files) for a in args]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "points.csv").write_text(EARLIER)  # an earlier run in the same folder
    r = inferno(*args, run_dir=run_dir)
    line = one_line_error(r)
    assert line.startswith(f"error: {start.format(files=files)}"), line
    for part in holds:
        assert part in line, (part, line)
    assert inferno.fits == [], "training started before the bad value was refused"
    assert r.seconds < 30, f"refused only after {r.seconds:.1f} s"
    assert (run_dir / "points.csv").read_text() == EARLIER  # nothing of the earlier run is lost or moved
    assert not (run_dir / "points.previous.csv").exists() and not (run_dir / "summary.json").exists()


SUBPROCESS_CASES = ["model-option", "checkpoint-garbage"]  # a composition error (cli), a run-time check (main)


def test_in_process_equals_the_real_command(inferno, files, tmp_path):
    """The same cases as real ``python -m inferno`` processes (started together): the same exit code and stderr."""
    procs = {}
    for name in SUBPROCESS_CASES:
        args = [a.format(files=files) for a in CASES[name][0]]
        argv = ["pruner=uniform", "logger=none", "hardware.num_threads=1", "hardware.progress_bar=false",
                f"hydra.run.dir={tmp_path / name}", f"paths.output_dir={tmp_path / 'outputs'}",
                f"paths.state_dir={tmp_path / 'state'}", *args]
        procs[name] = (args, subprocess.Popen([sys.executable, "-m", "inferno", *argv], cwd=ROOT, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
                                                   "OMP_NUM_THREADS": "1"}))
    for name, (args, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        real = Result(proc.returncode, err, "", 0.0)
        here = inferno(*args, run_dir=tmp_path / name)
        assert one_line_error(real) == one_line_error(here)
        assert real.err == here.err


# ---------------------------------------------------------------- a search to crash, cut and damage

SEARCH = ["task=digits", "model=microcnn", "model.stages=2", "model.depth=2", "model.base_channels=8",
          "hardware.limit_batches=2", "hardware.progress_bar=false", "hardware.num_threads=1",
          "hardware.latency_repeats=1", "hardware.latency_batch_size=8", "logger=none", "train.dense_epochs=1",
          "pruner=random_sampling", "pruner.max_samples=3", "pruner.epochs=1", "pruner.budget.macs=0.6"]


def assert_same_points(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert {k: v for k, v in g.items() if k not in UNCOMPARED} == {k: v for k, v in w.items() if k not in UNCOMPARED}


def cut_last_line(path: Path) -> tuple[bytes, bytes]:
    """Cut ``path``'s last row in the middle (as a crash mid-append leaves it); (the complete rows, the cut part)."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = start + (len(data) - start) // 2
    path.write_bytes(data[:cut])
    return data[:start], data[start:cut]


def test_points_csv_cut_by_a_crash_is_read_and_repaired(tmp_path, caplog):
    tracker = Tracker(tmp_path)
    from inferno.tracking import Point

    for step in range(3):
        tracker.add(Point("uniform", step, "microcnn", "digits", 0.5, 100 + step, 1000, 0.1, 0.2, 64, 6400,
                          "accuracy", 0.9 - step / 10, 1.0, extra={"arch": "B=1 D=[1]", "note": "a, quoted \"one\""}))
    path = tmp_path / "points.csv"
    rows = read_points(path)
    complete, cut = cut_last_line(path)
    assert cut and not cut.endswith(b"\n")
    with caplog.at_level(logging.WARNING, logger="inferno"):
        assert read_points(path) == rows[:2]
    assert "dropped a last line cut by a crash" in caplog.text and str(path) in caplog.text
    assert path.read_bytes() == complete + cut  # reading alone changes nothing
    assert read_points(path, repair=True) == rows[:2]
    assert path.read_bytes() == complete  # the complete rows only, ending with a line break
    assert read_points(path) == rows[:2]

    # a rerun's Tracker in that folder keeps the repaired rows as points.previous.csv and starts afresh
    cut_last_line(path)
    Tracker(tmp_path)
    assert not path.exists() and read_points(tmp_path / "points.previous.csv") == rows[:1]


def test_damaged_row_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("method,step,value\nuniform,1,0.9\nuniform,2\nuniform,3,0.7\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: line 3 does not have the header's 3 fields$"):
        read_points(path)
    path.write_text("method,step,value\nuniform,1,0.9,extra\nuniform,3,0.7\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: line 2 "):
        read_points(path, repair=True)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^hydra.run.dir: .*points.csv: line 2 .*move that file away"):
        Tracker(tmp_path)  # a rerun in that folder refuses it in one line, and moves nothing
    assert path.read_bytes() == before and not (tmp_path / "points.previous.csv").exists()


def test_damaged_points_csv_of_an_earlier_run_is_one_line(inferno, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    damaged = "method,step,value\nuniform,1\nuniform,2,0.8\n"
    (run_dir / "points.csv").write_text(damaged)
    line = one_line_error(inferno("pruner.ratios=[0.5]", run_dir=run_dir))
    assert line.startswith(f"error: hydra.run.dir: {run_dir / 'points.csv'}: line 2 does not have the header's 3 fields")
    assert inferno.fits == [] and (run_dir / "points.csv").read_text() == damaged
    assert not (run_dir / "points.previous.csv").exists()


def test_resumed_search_after_a_cut_points_csv_ends_complete(compose_cfg, tmp_path):
    """A search killed (stop_after) right after a row was half written; the rerun in the same folder repairs the
    file, keeps it as points.previous.csv and ends with the uninterrupted run's points."""
    run(compose_cfg(*SEARCH, f"paths.state_dir={tmp_path / 'ref_state'}"), tmp_path / "ref")
    want = read_points(tmp_path / "ref" / "points.csv")
    assert len(want) >= 3

    common = [*SEARCH, f"paths.state_dir={tmp_path / 'state'}"]
    with pytest.raises(SearchInterrupted):
        run(compose_cfg(*common, "pruner.stop_after=2"), tmp_path / "run")
    path = tmp_path / "run" / "points.csv"
    before = read_points(path)
    assert 0 < len(before) < len(want)
    complete, _ = cut_last_line(path)

    run(compose_cfg(*common), tmp_path / "run")
    assert (tmp_path / "run" / "points.previous.csv").read_bytes() == complete  # repaired, then kept
    got = read_points(path)
    assert_same_points(got, want)
    # the saved steps are replayed (the cut row's among them: its step's state was saved), the rest computed
    resumed = [r["resumed"] for r in got]
    assert resumed == ["True"] * resumed.count("True") + ["False"] * resumed.count("False")
    assert resumed.count("True") >= len(before) - 1


def state_dir_of(root: Path) -> Path:
    (d,) = root.glob("random_sampling-*")
    return d


EVIL = "fault_battery_evil_module"


def corruptions(marker: Path):
    """name -> what it does to a saved search state directory."""

    def truncate(path: Path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def weights(d: Path) -> Path:
        specs = json.loads((d / "state.json").read_text())["specs"]
        return d / min(s["file"] for s in specs.values())

    def rename_class(to: str):
        def apply(d: Path):
            data = json.loads((d / "state.json").read_text())
            for spec in data["specs"].values():
                spec["class"] = to
            (d / "state.json").write_text(json.dumps(data))
        return apply

    return {
        "state-json-truncated": lambda d: truncate(d / "state.json"),
        "state-json-garbage": lambda d: (d / "state.json").write_bytes(b"\x00\xff garbage, not JSON {"),
        "weights-truncated": lambda d: truncate(weights(d)),
        "class-os-system": rename_class("os:system"),
        "class-popen": rename_class("subprocess:Popen"),
        "class-unregistered-inferno": rename_class("inferno.models.microcnn:Other"),
        "class-evil-module": rename_class(f"{EVIL}:Net"),
    }


def evil_module(tmp_path: Path, monkeypatch) -> Path:
    """A module on sys.path that leaves a file behind if anything imports it."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / f"{EVIL}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "evil"))
    return marker


def test_damaged_state_is_one_line_and_resume_false_starts_over(inferno, tmp_path, monkeypatch):
    """Every damage to a saved search state: one line through the CLI (exit 2) naming pruner.resume and the way out;
    for a damaged file, that way out (pruner.resume=false) then runs the search afresh over it, and a further
    rerun resumes from the new state again."""
    marker = evil_module(tmp_path, monkeypatch)
    state = tmp_path / "state"
    args = [*SEARCH, f"paths.state_dir={state}"]
    r = inferno(*args, run_dir=tmp_path / "first")
    assert r.code == 0, r.err[-3000:]
    want = read_points(tmp_path / "first" / "points.csv")
    d = state_dir_of(state)
    shutil.copytree(d, tmp_path / "pristine")

    for name, damage in corruptions(marker).items():
        shutil.rmtree(d)
        shutil.copytree(tmp_path / "pristine", d)
        damage(d)
        inferno.fits.clear()
        r = inferno(*args, run_dir=tmp_path / name)
        line = one_line_error(r)
        assert line.startswith(f"error: pruner.resume: the saved search state {d} cannot be read ("), (name, line)
        assert "start over with pruner.resume=false" in line, line
        if name.startswith("class-"):
            assert "not one of" in line and all(c in line for c in STATE_CLASSES), line
            continue
        assert inferno.fits == [] and not (tmp_path / name / "points.csv").exists(), name
        # the documented way out: start over (the damaged state is overwritten) ...
        r = inferno(*args, "pruner.resume=false", run_dir=tmp_path / name)
        assert r.code == 0, (name, r.err[-3000:])
        fresh = read_points(tmp_path / name / "points.csv")
        assert_same_points(fresh, want)
        assert {p["resumed"] for p in fresh} == {"False"}
        # ... and resuming works again: the finished search is replayed whole
        r = inferno(*args, run_dir=tmp_path / f"{name}-resumed")
        assert r.code == 0, (name, r.err[-3000:])
        replayed = read_points(tmp_path / f"{name}-resumed" / "points.csv")
        assert_same_points(replayed, want)
        assert {p["resumed"] for p in replayed} == {"True"}
    assert not marker.exists() and EVIL not in sys.modules  # the state's class name was never imported


@pytest.mark.parametrize("name", ["os:system", "subprocess:Popen", "inferno.models.microcnn:Other",
                                  "inferno.models.microcnn", "builtins:eval", f"{EVIL}:Net"])
def test_state_file_never_names_code_to_import(tmp_path, monkeypatch, name):
    marker = evil_module(tmp_path, monkeypatch)
    store = StateStore(tmp_path / "s")
    store.save({"step": 0, "points": []}, {"dense": MicroCNN(2, 1, 1, 8)})
    _, nets = store.load()  # untouched: loads
    assert isinstance(nets["dense"], MicroCNN)
    data = json.loads((tmp_path / "s" / "state.json").read_text())
    assert data["specs"]["dense"]["class"] in STATE_CLASSES
    data["specs"]["dense"]["class"] = name
    (tmp_path / "s" / "state.json").write_text(json.dumps(data))
    imported = []
    real = loop.importlib.import_module
    monkeypatch.setattr(loop.importlib, "import_module", lambda m, *a: imported.append(m) or real(m, *a))
    with pytest.raises(ValueError, match=re.escape(f"state names network class '{name}', not one of ")):
        store.load()
    assert imported == [] and not marker.exists() and EVIL not in sys.modules


def test_fresh_start_rewrites_a_damaged_weights_file(tmp_path):
    """pruner.resume=false over a state whose weights file was cut: the new state's file of the same content (and
    so the same name) is written again, not kept damaged (the next resume would fail again)."""
    store = StateStore(tmp_path / "s")
    net = MicroCNN(2, 1, 1, 8)
    store.save({"step": 0, "points": []}, {"dense": net})
    (f,) = (tmp_path / "s").glob("*.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="deserializing header"):
        store.load()
    store.save({"step": 0, "points": []}, {"dense": net})  # what a fresh start saves first
    assert f.read_bytes() == data
    _, nets = store.load()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in nets["dense"].state_dict().items())


# ---------------------------------------------------------------- weights only through safetensors


def sources() -> list[Path]:
    files = sorted((ROOT / "inferno").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(files) > 20
    return files


def dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_sources_read_weights_only_safely():
    """Every ``torch.load`` passes ``weights_only=True``; nothing unpickles a file (pickle, joblib, numpy's
    allow_pickle); nothing passes ``trust_remote_code=True``."""
    bad, torch_loads = [], 0
    for path in sources():
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                kw = {k.arg: k.value for k in node.keywords}
                if name == "torch.load":
                    torch_loads += 1
                    v = kw.get("weights_only")
                    if not (isinstance(v, ast.Constant) and v.value is True):
                        bad.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and \
                        name.split(".")[-1] in ("load", "loads", "Unpickler"):
                    bad.append(f"{rel}:{node.lineno}: {name}")
                if name.endswith(("np.load", "numpy.load")):
                    v = kw.get("allow_pickle")
                    if isinstance(v, ast.Constant) and v.value:
                        bad.append(f"{rel}:{node.lineno}: np.load(allow_pickle=True)")
                v = kw.get("trust_remote_code")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{rel}:{node.lineno}: trust_remote_code is not False")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                    bad.append(f"{rel}:{node.lineno}: imports a pickle module")
        if "trust_remote_code=True" in path.read_text():
            bad.append(f"{rel}: trust_remote_code=True")
    assert bad == []
    assert torch_loads >= 1  # the scan sees the calls there are


def test_model_folder_with_only_a_pickle_is_refused(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path / "m", weights=False, bin_only=True)

    def no_unpickling(*a, **kw):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ConfigError) as e:
        check_model_folder(folder)
    msg = str(e.value)
    assert msg.startswith(f"model.path: no safetensors weights in {folder}") and "\n" not in msg
    assert "pytorch_model.bin not read: weights only through safetensors" in msg
