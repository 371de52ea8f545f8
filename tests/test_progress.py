"""Progress on long loops: a bar where a loop can take more than a few seconds (evaluation batches, input capture,
random sampling's draws, the supernet's candidate pool), none with ``hardware.progress_bar=false``, and one log
line per finished sample; the numbers are the same with and without bars."""

import logging
from types import SimpleNamespace

import pytest
import torch

from inferno.models.hf import tiny_causal_lm
from inferno.pruning.llm.runner import capture_inputs
from inferno.run import run
from inferno.tasks.lm import WikiText2Task
from inferno.tracking import read_points

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" * 20
SMALL = ["task=digits", "model=microcnn", "model.stages=2", "model.depth=2", "model.base_channels=8",
         "hardware.limit_batches=2", "hardware.latency_repeats=1", "hardware.latency_batch_size=8",
         "hardware.num_threads=1", "train.dense_epochs=1", "logger=none"]


def test_perplexity_and_capture_bars_follow_the_switch(tmp_path, capfd):
    model = tiny_causal_lm("llama", seed=0, max_positions=512)
    (tmp_path / "t.raw").write_text(TEXT)
    task = WikiText2Task(path=str(tmp_path / "t.raw"), seqlen=48, limit=4, batch_size=2)
    quiet = task.evaluate(model, "test", SimpleNamespace(progress_bar=False))
    assert "perplexity" not in capfd.readouterr().err
    shown = task.evaluate(model, "test", SimpleNamespace(progress_bar=True))
    assert "perplexity:   0%|          | 0/2" in capfd.readouterr().err  # 2 batches (the bar clears itself)
    assert shown == quiet  # a bar changes nothing computed

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    a = capture_inputs(model, ids, batch_size=2, progress=True)
    assert "capture inputs:   0%|          | 0/2" in capfd.readouterr().err
    b = capture_inputs(model, ids, batch_size=2)
    assert capfd.readouterr().err == ""
    assert len(a.hidden) == 2 and all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden))


@pytest.mark.parametrize("bars", [True, False])
def test_random_sampling_and_supernet_bars_and_log_lines(compose_cfg, tmp_path, capfd, caplog, bars):
    caplog.set_level(logging.INFO, logger="inferno")
    run(compose_cfg(*SMALL, "pruner=random_sampling", "pruner.max_samples=2", "pruner.epochs=1",
                    f"hardware.progress_bar={str(bars).lower()}", f"paths.state_dir={tmp_path / 'state'}"),
        tmp_path / "rs")
    err = capfd.readouterr().err.replace("\r", "\n")
    assert ("random_sampling: samples" in err) is bars
    if bars:
        assert "random_sampling: samples: 100%" in err and "2/2" in err
    lines = [r.getMessage() for r in caplog.records if "random_sampling: sample " in r.getMessage()]
    points = [p for p in read_points(tmp_path / "rs" / "points.csv") if p["method"] == "random_sampling"]
    assert len(lines) == len(points) == 2  # one line per finished sample, whatever the bars
    for line, p in zip(lines, points):
        assert f"val {float(p['val_value']):.4f}" in line

    run(compose_cfg(*SMALL, "pruner=supernet", "pruner.depth_epochs=1", "pruner.width_epochs=1",
                    "pruner.candidates=2", "pruner.finetune_epochs=1", "pruner.recalibration_batches=1",
                    f"hardware.progress_bar={str(bars).lower()}", f"paths.state_dir={tmp_path / 'state'}"),
        tmp_path / "sn")
    err = capfd.readouterr().err
    assert ("supernet: candidate pool" in err) is bars
    assert any("supernet: 2 candidate(s) within" in r.getMessage() for r in caplog.records)
