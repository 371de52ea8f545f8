"""The thesis' greedy (children, weight copy, score, selection rule) and the grid baseline, checked against the
rules written out here."""

import itertools
import json

import pytest
import torch

from inferno.cost import count_macs
from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.run import run
from inferno.search.greedy import GreedyThesis, thesis_pick
from inferno.search.moves import MoveOptions, children
from inferno.tracking import read_points

X = torch.zeros(1, 1, 28, 28)
FAST = ["task=digits", "model.stages=3", "model.depth=2", "model.width=1", "model.base_channels=8",
        "train.dense_epochs=1", "hardware.limit_batches=3", "hardware.latency_repeats=1",
        "hardware.latency_batch_size=8", "hardware.progress_bar=false", "logger=none"]


def thesis_children(parent):
    g = GreedyThesis(budget={"macs": 0.5})
    return children(parent, g.moves, MoveOptions(X, drop_block_scope=g.drop_block_scope), g.transfer)


def test_thesis_children_of_a_known_network_copy_weights_by_name():
    torch.manual_seed(0)
    parent = MicroCNN(3, 2, 2, 16, in_channels=1)
    for t in parent.state_dict().values():  # no tensor left at its initial value
        if t.is_floating_point():
            t.uniform_(-1, 1)
    b, d = thesis_children(parent)
    assert (b.move, d.move) == ("drop_stage", "drop_block")
    assert b.net.spec() == MicroCNN(2, 2, 2, 16).spec()  # B-1: the last stage gone
    assert d.net.spec() == MicroCNN(3, 1, 2, 16).spec()  # D-1: the last block of every stage gone
    src = parent.state_dict()
    for name, t in d.net.state_dict().items():  # D-1: every tensor the parent's of the same name
        assert torch.equal(t, src[name]), name
    for name, t in b.net.state_dict().items():  # B-1: only the head differs, its leading slice copied
        if name == "head.weight":
            assert t.shape == (10, 64) and torch.equal(t, src[name][:, :64])
        else:
            assert torch.equal(t, src[name]), name


@pytest.mark.parametrize("b, d, expected", [
    ((0.90, True), (0.80, True), "drop_stage"),    # B-1 more accurate and above the threshold
    ((0.90, False), (0.80, True), "drop_block"),   # B-1 more accurate but below: D-1 is above
    ((0.70, True), (0.80, True), "drop_block"),    # D-1 more accurate, above
    ((0.80, True), (0.80, True), "drop_block"),    # a tie is not "more accurate"
    ((0.70, True), (0.80, False), "drop_block"),   # D-1 below and more accurate: it ends the search
    ((0.90, True), (0.80, False), "drop_stage"),   # B-1 more accurate and above: kept, the search goes on
    ((0.90, False), (0.80, False), "drop_stage"),  # both below: the more accurate
    ((0.70, False), (0.80, False), "drop_block"),
    ((0.80, False), (0.80, False), "drop_stage"),  # ... B-1 on a tie (the reference code's else branch)
    ((0.70, True), None, "drop_stage"),            # only one child (D = 1 everywhere)
    (None, (0.70, False), "drop_block"),           # only one child (B = 1)
])
def test_thesis_selection_rule(b, d, expected):
    assert thesis_pick(b, d) == expected


def test_thesis_pick_through_the_searchs_figures():
    g = GreedyThesis(budget={"macs": 100})  # absolute threshold: 100 MACs

    class P:
        def __init__(self, move, macs, hist):
            self.extra = {"move": move, "val_history": hist}
            self.macs = macs

    state = {"limits": g.budget.limits({"macs": 1000, "params": 1, "latency_ms": 1})}
    bp, dp = P("drop_stage", 150, [0.1, 0.9, 0.9]), P("drop_block", 120, [0.5, 0.6, 0.7])
    assert g.score(bp, state) == pytest.approx((0.1 + 0.9 + 0.9) / 3)
    scored = [(g.score(p, state), {"macs": p.macs}, p) for p in (bp, dp)]
    assert g.pick(scored, state) == 0  # B-1: 0.633 > 0.6 and 150 > 100
    dp.macs = 100  # at the threshold counts as above (the reference compares flops >= threshold)
    bp.macs = 99  # B-1 now below the threshold; D-1 above
    assert g.pick([(s, {"macs": p.macs}, p) for s, _, p in scored], state) == 1
    long = P("drop_stage", 150, [0.0, 0.2, 0.4, 0.6, 0.8])  # only the last 4 epochs count
    assert g.score(long, state) == pytest.approx(0.5)


def test_thesis_options_are_checked_at_construction():
    with pytest.raises(ConfigError, match="pruner.narrow_ratio: greedy_thesis has no"):
        GreedyThesis(budget={"macs": 0.5}, narrow_ratio=0.5)
    with pytest.raises(ConfigError, match="pruner.finetune_epochs"):
        GreedyThesis(budget={"macs": 0.5}, finetune_epochs=0.5)
    with pytest.raises(ConfigError, match="pruner.schedule: unknown value 'cosine'; allowed: onecycle, constant"):
        GreedyThesis(budget={"macs": 0.5}, schedule="cosine")
    with pytest.raises(ConfigError, match="pruner.score_epochs"):
        GreedyThesis(budget={"macs": 0.5}, score_epochs=0)


def test_greedy_thesis_run_follows_its_rule(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "pruner=greedy_thesis", "pruner.budget.macs=0.58", "pruner.finetune_epochs=2",
                      "pruner.score_epochs=4", "pruner.final_epochs=1", f"paths.state_dir={tmp_path / 's'}")
    objective = run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    dense, final = rows[0], rows[-1]
    limit = 0.58 * int(dense["macs"])
    assert final["phase"] == "final" and int(final["macs"]) <= limit and objective == pytest.approx(float(final["value"]))
    kids = [r for r in rows if r.get("phase") == "child"]
    steps = sorted({int(r["step"]) for r in kids})
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    for s in steps:
        here = {r["move"]: r for r in kids if int(r["step"]) == s}
        for r in here.values():  # the score: mean validation accuracy over the (up to 4) epochs
            hist = json.loads(r["val_history"])
            assert len(hist) == 2 and float(r["score"]) == pytest.approx(sum(hist) / 2)
            assert hist[-1] == pytest.approx(float(r["val_value"]))
        fig = {m: (float(r["score"]), int(r["macs"]) >= limit) for m, r in here.items()}
        chosen = thesis_pick(fig.get("drop_stage"), fig.get("drop_block"))
        assert [m for m, r in here.items() if r["selected"] == "True"] == [chosen]
        if s < steps[-1]:  # the search goes on only while the kept child is above the threshold
            assert fig[chosen][1]
    assert not fig[chosen][1]
    # every child is 2 epochs of 3 batches of 64, the winner 1 epoch, all on top of the start model's cost
    assert int(final["train_samples"]) == int(dense["train_samples"]) + len(kids) * 2 * 3 * 64 + 3 * 64


def test_grid_trains_every_configuration_under_the_budget_from_scratch(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "model.width=2", "pruner=grid", "pruner.budget.macs=0.4", f"paths.state_dir={tmp_path / 's'}")
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    dense, grid = rows[0], [r for r in rows if r["method"] == "grid"]
    x = torch.zeros(1, 1, 8, 8)
    expected = {(b, d, w) for b, d, w in itertools.product((1, 2, 3), (1, 2), (1, 2))
                if count_macs(MicroCNN(b, d, w, 8), x) <= 0.4 * int(dense["macs"])}
    assert {(int(r["B"]), int(r["D"]), int(r["W"])) for r in grid} == expected and len(grid) == len(expected)
    assert all(int(r["own_samples"]) == 3 * 64 for r in grid)  # train.dense_epochs=1 of 3 batches each
    assert [int(r["train_samples"]) for r in grid] == [3 * 64 * (i + 1) for i in range(len(grid))]
    for r in grid:
        ref = MicroCNN(int(r["B"]), int(r["D"]), int(r["W"]), 8)
        assert int(r["macs"]) == count_macs(ref, x)
    summary = json.loads((tmp_path / "summary.json").read_text())
    best_val = max(grid, key=lambda r: float(r["val_value"]))  # the first of equals, as max() keeps
    assert summary["objective"] == pytest.approx(float(best_val["value"]))
    # the Pareto front of the grid (summary's results): no configuration cheaper-or-equal and more accurate
    result = summary["results"]["grid"]
    assert result["configs"] == len(grid)
    assert result["mean_value"] == pytest.approx(sum(float(r["value"]) for r in grid) / len(grid))
    front = {(f["B"], f["D"], f["W"]) for f in result["pareto"]}
    for r in grid:  # on the front exactly when no configuration as cheap or cheaper is more accurate
        beaten = any(int(o["macs"]) <= int(r["macs"]) and float(o["value"]) > float(r["value"]) for o in grid)
        if beaten:
            assert (int(r["B"]), int(r["D"]), int(r["W"])) not in front
    assert front and all(not any(int(o["macs"]) <= f["macs"] and float(o["value"]) > f["value"] for o in grid)
                         for f in result["pareto"])


def test_thesis_stops_at_the_smallest_network_even_above_the_threshold():
    from types import SimpleNamespace

    g = GreedyThesis(budget={"macs": 10})
    logged = []
    ctx = SimpleNamespace(log=logged.append)
    state = {"current": {"macs": 50, "params": 1, "latency_ms": 1.0}, "limits": {"macs": 10}}
    assert g.done(ctx, state, {"current": MicroCNN(1, 1, 1, 8)})  # B = D = 1: nothing left to remove
    assert logged and "still above" in logged[0]
    assert not g.done(ctx, state, {"current": MicroCNN(1, 2, 1, 8)})  # D-1 is still possible
    state["current"]["macs"] = 10  # at the threshold counts as above
    assert not g.done(ctx, state, {"current": MicroCNN(2, 1, 1, 8)})
    state["current"]["macs"] = 9
    assert g.done(ctx, state, {"current": MicroCNN(2, 1, 1, 8)})
