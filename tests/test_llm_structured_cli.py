"""Structured pruners through the Hydra configs: the points' sparsity is the attention + MLP parameters removed and
the cost is the smaller model's; save=true exports a model that reloads (load_model) and evaluates to the recorded
perplexity; NIRVANA's KL choice keeps the seed with the lowest KL on windows no seed calibrated on; bad options stop
with one line before the model is touched."""

import json

import pytest

from inferno.errors import ConfigError
from inferno.models.hf import load_model
from inferno.pruning.llm.structured import attn_mlp_params
from inferno.run import RunContext, build, run
from inferno.tracking import Tracker, read_points

FAST = ("logger=none", "hardware.progress_bar=false", "hardware.latency_repeats=2", "pruner.decode_tokens=4")
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, the age of foolishness.\n" * 80


@pytest.fixture
def text_task(tmp_path):
    p = tmp_path / "corpus.raw"
    p.write_text(TEXT)
    return (f"task.path={p}", "task.limit=4", "task.seqlen=64", "pruner.calibration=task", "pruner.nsamples=4",
            "pruner.seqlen=64")


def context(cfg, run_dir):
    pruner, net, task = build(cfg, "pruner"), build(cfg, "model"), build(cfg, "task")
    task.setup()
    ctx = RunContext(cfg=cfg, net=net, task=task, trainers=None, tracker=Tracker(run_dir), train=None, run_dir=run_dir)
    return pruner, net, task, ctx


@pytest.mark.parametrize("name", ["nirvana", "flap", "wanda_sp", "llm_pruner", "shortgpt"])
def test_structured_point_save_and_reload(compose_cfg, tmp_path, text_task, name):
    over = ["model=tiny_llama", "model.layers=4", "task=wikitext2", f"pruner={name}", "save=true", *text_task, *FAST]
    cfg = compose_cfg(*over, *(["pruner.gamma=1.0"] if name == "nirvana" else []))
    pruner, net, task, ctx = context(cfg, tmp_path)
    before = attn_mlp_params(net)
    pruner.run(ctx)
    dense, pruned = read_points(tmp_path / "points.csv")
    assert (dense["method"], pruned["method"]) == ("dense", name)
    achieved = 1 - attn_mlp_params(net) / before
    assert float(pruned["sparsity"]) == pytest.approx(achieved, abs=1e-6) and achieved > 0.15
    assert int(pruned["params"]) == sum(p.numel() for p in net.parameters()) < int(dense["params"])
    assert int(pruned["macs"]) < int(dense["macs"]) and float(pruned["decode_tok_s"]) > 0
    assert pruned["pattern"] == "structured" and float(pruned["target_sparsity"]) == 0.5
    structure = json.loads((tmp_path / "structure.json").read_text())
    assert structure["achieved_sparsity"] == pytest.approx(achieved)
    # the export reloads through the conf builder and evaluates to the recorded perplexity
    back = load_model(str(tmp_path / "model"))
    assert sum(p.numel() for p in back.parameters()) == int(pruned["params"])
    assert task.evaluate(back)["perplexity"] == pytest.approx(float(pruned["value"]), rel=1e-6)
    report = json.loads((tmp_path / "model" / "pruning_report.json").read_text())
    assert report["method"] == name and report["removed_blocks"] == structure["removed_blocks"]


def test_kl_choice_keeps_the_lowest_kl_on_unseen_windows(compose_cfg, tmp_path, text_task):
    big = tmp_path / "big.raw"
    big.write_text(TEXT * 6)
    over = [o if not o.startswith("task.path=") else f"task.path={big}" for o in text_task]
    cfg = compose_cfg("model=tiny_llama", "task=wikitext2", "pruner=nirvana", "pruner.gamma=1.0", "pruner.kl_seeds=3",
                      "pruner.kl_nsamples=2", "seed=1", *over, *FAST)
    pruner, net, task, ctx = context(cfg, tmp_path)
    assert pruner.kl_seeds == [3, 4, 5]  # a count n: seeds seed*n .. seed*n + n-1
    pruner.run(ctx)
    calib = json.loads((tmp_path / "calibration.json").read_text())
    kl = {int(k): v for k, v in calib["kl"].items()}
    assert set(kl) == {3, 4, 5} and calib["kl_seed"] == min(kl, key=kl.get) == calib["seed"]
    held = calib["kl_windows"]
    for s in (3, 4, 5):  # no held-out window overlaps any seed's calibration windows
        used = pruner.draw(net, task, seed=s).windows
        assert not any(w.start < h[2] and h[1] < w.end for w in used for h in held)
    assert float(read_points(tmp_path / "points.csv")[1]["kl"]) == pytest.approx(kl[calib["kl_seed"]], rel=1e-5)


def test_kl_source_too_small_stops_before_the_dense_point(compose_cfg, tmp_path, text_task):
    cfg = compose_cfg("model=tiny_llama", "task=wikitext2", "pruner=nirvana", "pruner.kl_seeds=3", *text_task, *FAST)
    pruner, _, _, ctx = context(cfg, tmp_path)
    with pytest.raises(ConfigError, match="pruner.kl_nsamples"):
        pruner.run(ctx)
    assert not ctx.tracker.points


@pytest.mark.parametrize("overrides, line", [
    (("pruner=nirvana", "pruner.gamma=0"), "pruner.gamma: 0 must be a number > 0"),
    (("pruner=nirvana", "pruner.round_to=0"), "pruner.round_to: 0 must be an integer >= 1"),
    (("pruner=flap", "pruner.pattern=2:4"), "pruner.pattern: flap removes whole heads"),
    (("pruner=llm_pruner", "pruner.skip_layers=[0,1]"), "pruner.skip_layers: every layer is skipped"),
    (("pruner=shortgpt", "pruner.sparsity=0.8"), "pruner.sparsity=0.8 would remove all 2 blocks"),
])
def test_bad_options_one_line_before_work(compose_cfg, tmp_path, text_task, overrides, line):
    """Option values fail when the pruner is built (before the data is read); what the model's size decides fails
    before calibration and before the dense point."""
    with pytest.raises(ConfigError) as e:
        run(compose_cfg("model=tiny_llama", "task=wikitext2", *text_task, *overrides, "logger=none"), tmp_path / "run")
    assert str(e.value).startswith(line) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "points.csv").exists()
