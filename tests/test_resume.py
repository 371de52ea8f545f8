"""Resume you can trust: a search killed at a random step (SIGKILL, a real process) and rerun ends bit-identical
to an uninterrupted run (greedy, random sampling, the supernet); anything that changes the result (hardware settings, a data file's bytes, the code)
starts a fresh search instead of replaying; a kill between a step's weights and its state.json leaves the
previous step, whole.

The kill cases run the CLI as subprocesses (~10 s each here, most of it imports): ``greedy_layerwise`` with
``transfer=importance``, ``random_sampling`` and ``supernet`` always; with ``transfer=leading_slice`` and ``greedy_thesis`` marked ``slow``
(``pytest tests/test_resume.py -m "not slow"`` skips them, ``-m slow`` runs only them)."""

import copy
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from omegaconf import OmegaConf
from safetensors.torch import load_file

from inferno.config import ROOT, build
from inferno.models.microcnn import MicroCNN
from inferno.run import run
from inferno.search import loop
from inferno.search.loop import SearchInterrupted, StateStore, key_digest, state_key
from inferno.tasks.vision import DigitsTask, MNISTTask
from inferno.tracking import read_points

SMALL = ["task=digits", "model=microcnn", "model.stages=2", "model.depth=2", "model.base_channels=8",
         "hardware.limit_batches=2", "hardware.progress_bar=false", "hardware.num_threads=1",
         "hardware.latency_repeats=1", "hardware.latency_batch_size=8", "logger=none", "train.dense_epochs=1"]
# columns that measure the machine or say where a point came from, not what the search computed
UNCOMPARED = {"wall_s", "latency_ms", "peak_mem_mb", "resumed"}

GREEDY = ["pruner=greedy_layerwise", "pruner.moves=[drop_stage,drop_block,narrow]", "pruner.budget.macs=0.3",
          "pruner.final_epochs=1", "pruner.scratch_epochs=1"]
CASES = {
    "greedy-importance": ([*GREEDY, "pruner.transfer=importance"], "greedy_final"),
    "greedy-leading_slice": ([*GREEDY, "pruner.transfer=leading_slice"], "greedy_final"),
    "greedy_thesis": (["pruner=greedy_thesis", "pruner.budget.macs=0.45", "pruner.finetune_epochs=1",
                       "pruner.score_epochs=1", "pruner.final_epochs=1"], "greedy_thesis_final"),
    "random_sampling": (["pruner=random_sampling", "pruner.max_samples=3", "pruner.epochs=1"], "random_sampling_best"),
    "supernet": (["pruner=supernet", "pruner.depth_epochs=1", "pruner.width_epochs=1", "pruner.candidates=3",
                  "pruner.finetune_epochs=1", "pruner.recalibration_batches=1"], "supernet_final"),
}


def cli(overrides: list[str], tmp: Path) -> list[str]:
    return [sys.executable, "-m", "inferno", *overrides, f"paths.output_dir={tmp}", f"paths.state_dir={tmp / 'state'}",
            f"hydra.run.dir={tmp / 'run'}"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def saved_state(state_root: Path) -> dict | None:
    """The one search's state.json under ``state_root`` (None before its first save)."""
    for f in state_root.glob("*/state.json"):
        try:
            return json.loads(f.read_text())["state"]
        except (OSError, ValueError):  # os.replace makes this all-or-nothing; a vanished file is a race
            return None
    return None


def kill_at_step(cmd: list[str], state_root: Path, step: int, rng: random.Random) -> dict:
    """Start ``cmd``, SIGKILL it while search step ``step`` runs (the saved state says ``step - 1``; ``step`` =
    the number of search steps + 1 is the final phase), a random moment into it; the state it left."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            s = saved_state(state_root)
            if s is not None and s["step"] >= step - 1:
                assert not s.get("finished"), "the search finished before the kill"
                time.sleep(rng.uniform(0.0, 0.05))  # somewhere into the step (a step takes 0.2 s or more)
                break
            assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.01)
        else:
            pytest.fail("no search state appeared in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return saved_state(state_root)


def assert_same_points(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert {k: v for k, v in g.items() if k not in UNCOMPARED} == {k: v for k, v in w.items() if k not in UNCOMPARED}


@pytest.mark.parametrize("case", [
    "greedy-importance", "random_sampling", "supernet",
    pytest.param("greedy-leading_slice", marks=pytest.mark.slow),
    pytest.param("greedy_thesis", marks=pytest.mark.slow),
])
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(case, compose_cfg, tmp_path):
    overrides, final = CASES[case]
    # the uninterrupted reference, in this process (same code, same seed, one thread)
    run(compose_cfg(*SMALL, *overrides, f"paths.state_dir={tmp_path / 'ref_state'}"), tmp_path / "ref")
    want = read_points(tmp_path / "ref" / "points.csv")
    assert {p["resumed"] for p in want} == {"False"}  # the start model's point included
    steps = saved_state(tmp_path / "ref_state")["step"]
    assert steps >= 2, "the budget must take 2+ steps for the kill to land mid-search"

    # the kill step: random, the same on every run of the test (RESUME_KILL_SEED=<n> picks other ones)
    rng = random.Random(f"resume-{os.environ.get('RESUME_KILL_SEED', '')}{case}")
    step = rng.randint(1, steps + 1)  # a search step or the final phase
    cmd = cli([*SMALL, *overrides], tmp_path / "b")
    left = kill_at_step(cmd, tmp_path / "b" / "state", step, rng)
    assert left is not None and not left.get("finished")
    (state_json,) = (tmp_path / "b" / "state").glob("*/state.json")
    replayed = len(left["points"])
    print(f"{case}: killed while step {left['step'] + 1} of {steps} (+1: the final phase) ran; {replayed} points saved")

    r = subprocess.run(cmd, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "b" / "state").glob("*/state.json"))) == 1, \
        "the rerun did not find the killed run's state (was inferno's source edited while the test ran?)"
    got = read_points(tmp_path / "b" / "run" / "points.csv")
    assert_same_points(got, want)
    assert [p["resumed"] for p in got] == ["True"] * replayed + ["False"] * (len(got) - replayed), f"killed at {step}"
    a = load_file(tmp_path / "ref" / f"{final}.safetensors")
    b = load_file(tmp_path / "b" / "run" / f"{final}.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # nothing left over in the state dir: the files state.json names, the key and the state
    data = json.loads(state_json.read_text())
    named = {s["file"] for s in data["specs"].values()}
    assert data["state"]["finished"] and {f.name for f in state_json.parent.iterdir()} == named | {"state.json", "key.json"}

    # a finished search rerun (in a new run dir) replays every point and writes its final weights there too
    run(compose_cfg(*SMALL, *overrides, f"paths.state_dir={tmp_path / 'ref_state'}"), tmp_path / "again")
    again = read_points(tmp_path / "again" / "points.csv")
    assert_same_points(again, want)
    assert {p["resumed"] for p in again} == {"True"}
    c = load_file(tmp_path / "again" / f"{final}.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- what the state key sees


def fake_mnist(root: Path, label: int = 7) -> Path:
    (root / "mnist").mkdir(parents=True)
    for name, header, body in (("t10k-images-idx3-ubyte.gz", 16, bytes(28 * 28 * 3)),
                               ("t10k-labels-idx1-ubyte.gz", 8, bytes([1, 2, label]))):
        (root / "mnist" / name).write_bytes(gzip.compress(bytes(header) + body, mtime=0))
    return root


def test_state_key_changes_with_what_changes_the_result(compose_cfg, tmp_path, monkeypatch):
    fake_mnist(tmp_path / "a")
    cfg = compose_cfg("task=mnist", "pruner=greedy_layerwise", f"paths.state_dir={tmp_path / 'state'}",
                      f"paths.data_dir={tmp_path / 'a'}")

    def digest(*changes, data_dir=tmp_path / "a"):
        c = copy.deepcopy(cfg)
        c.task.data_dir = str(data_dir)
        for change in changes:
            k, v = change.split("=")
            OmegaConf.update(c, k, yaml.safe_load(v))
        return key_digest(state_key(c, build(c, "task"), build(c, "pruner").options()))

    base = digest()
    assert digest() == base
    for changed in ("hardware.limit_batches=3", "hardware.precision=bf16-mixed", "hardware.accelerator=gpu",
                    "hardware.deterministic=true", "hardware.num_threads=2", "hardware.latency_repeats=3", "seed=1",
                    "train.lr=0.01", "task.batch_size=32", "model.width=1", "pruner.narrow_ratio=0.5",
                    "pruner.final_epochs=2", "pruner.budget.macs=0.4"):
        assert digest(changed) != base, changed
    for same in ("hardware.progress_bar=false", "logger=null", "pruner.stop_after=1", "pruner.resume=false",
                 "plot.x_axes=[params]", f"paths.output_dir={tmp_path}"):
        assert digest(same) == base, same
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert digest(data_dir=tmp_path / "moved") == base  # where the data lies is not what it is
    fake_mnist(tmp_path / "c", label=8)  # one byte of one file differs
    assert digest(data_dir=tmp_path / "c") != base
    code = loop.code_version()
    monkeypatch.setattr(loop, "code_version", lambda: {**code, "source_sha256": "edited"})
    assert digest() != base  # an edit of the code never replays an old answer


def test_state_key_is_cheap_and_caches_file_digests(compose_cfg, tmp_path, monkeypatch):
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in MNISTTask.files:
        (data / name).write_bytes(os.urandom(4 << 20))  # 4 MB each
    cfg = compose_cfg("task=mnist", "pruner=greedy_layerwise", f"paths.state_dir={tmp_path / 'state'}",
                      f"paths.data_dir={tmp_path / 'data'}")
    task, options = build(cfg, "task"), build(cfg, "pruner").options()
    loop.code_version.cache_clear()
    t = time.perf_counter()
    first = state_key(cfg, task, options)
    assert time.perf_counter() - t < 0.2
    assert (tmp_path / "state" / loop.DIGEST_CACHE).is_file()
    monkeypatch.setattr(loop, "_DIGESTS", {})  # a new process: only the on-disk cache

    def no_read(*a, **kw):
        raise AssertionError("a data file was read again")

    monkeypatch.setattr(loop, "open", no_read, raising=False)  # what file_digest reads files with
    assert state_key(cfg, task, options) == first
    assert [len(d) for d in first["data"].values()] == [64, 64]


def test_digits_task_names_the_file_it_reads():
    (f,) = DigitsTask().data_files()
    assert f.is_file() and f.name == "digits.csv.gz"


# ---------------------------------------------------------------- a changed setting or data file starts afresh


def digits_from(path: Path) -> Dataset:
    """What DigitsTask.load does, from a copy of sklearn's file."""
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    images = (data[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0 - 0.5) / 0.5
    return Dataset.from_dict({"image": images[:, None], "label": data[:, -1].astype(np.int64)})


def test_changed_hardware_or_data_starts_a_fresh_search(compose_cfg, tmp_path, monkeypatch):
    data = tmp_path / "digits.csv.gz"
    shutil.copy(DigitsTask().data_files()[0], data)
    monkeypatch.setattr(DigitsTask, "data_files", lambda self: [data])
    monkeypatch.setattr(DigitsTask, "load", lambda self: digits_from(data))
    common = [*SMALL, "pruner=random_sampling", "pruner.epochs=1", "pruner.max_samples=2", "pruner.budget.macs=0.6",
              f"paths.state_dir={tmp_path / 'state'}"]

    def attempt(name, *overrides):
        try:
            run(compose_cfg(*common, *overrides), tmp_path / name)
        except SearchInterrupted:
            pass
        return [r["resumed"] for r in read_points(tmp_path / name / "points.csv")]

    assert attempt("a", "pruner.stop_after=1") == ["False"]
    assert attempt("b") == ["True", "False"]  # the same command: the first sample replayed
    assert len(list((tmp_path / "state").glob("random_sampling-*"))) == 1
    assert attempt("c", "hardware.limit_batches=3") == ["False", "False"]  # a hardware setting: afresh
    assert len(list((tmp_path / "state").glob("random_sampling-*"))) == 2
    text = gzip.decompress(data.read_bytes())
    i = text.index(b",16,")  # one pixel of one image: 16 -> 15
    data.write_bytes(gzip.compress(text[:i] + b",15," + text[i + 4:]))
    assert attempt("d") == ["False", "False"]  # a data file's byte: afresh
    assert len(list((tmp_path / "state").glob("random_sampling-*"))) == 3
    assert attempt("e") == ["True", "True"]  # and that search, finished, is replayed whole


# ---------------------------------------------------------------- crash-safe StateStore


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_state_store_survives_a_kill_between_weights_and_state(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "s")
    torch.manual_seed(0)
    dense, current = MicroCNN(2, 1, 1, 8), MicroCNN(2, 1, 1, 8)
    store.save({"step": 1, "points": []}, {"dense": dense, "current": current})
    step1 = weights(current)
    with torch.no_grad():  # step 2 changes the current network...
        for p in current.parameters():
            p.add_(1.0)
    real = loop._write_atomic

    def killed_before_state(path, data):
        if path.name == "state.json":
            raise KeyboardInterrupt("killed")  # ... and the process dies before its state.json lands
        real(path, data)

    monkeypatch.setattr(loop, "_write_atomic", killed_before_state)
    with pytest.raises(KeyboardInterrupt):
        store.save({"step": 2, "points": [1]}, {"dense": dense, "current": current})
    monkeypatch.setattr(loop, "_write_atomic", real)
    (tmp_path / "s" / "0123456789abcdef.safetensors.999.tmp").write_bytes(b"half a file")  # a torn write
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 3  # step 2's weights are on disk ...

    state, nets = store.load()  # ... yet the previous step loads, whole
    assert state == {"step": 1, "points": []}
    assert all(torch.equal(nets["current"].state_dict()[k], v) for k, v in step1.items())
    assert all(torch.equal(nets["dense"].state_dict()[k], v) for k, v in dense.state_dict().items())

    store.save({"step": 2, "points": [1]}, {"dense": dense, "current": current})  # the rerun redoes step 2
    state, nets = store.load()
    assert state["step"] == 2 and all(torch.equal(nets["current"].state_dict()[k], v)
                                      for k, v in current.state_dict().items())
    files = sorted(f.name for f in (tmp_path / "s").iterdir())
    assert len(files) == 3 and "state.json" in files and not any(f.endswith(".tmp") for f in files)  # swept
