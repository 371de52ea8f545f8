"""CNN search: moves, weight transfer, greedy budget, resume, random sampling's cost, the supernet."""

import json

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import load_file

from inferno.cost import count_macs, count_params
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.run import run
from inferno.search.loop import SearchInterrupted
from inferno.search.moves import MoveOptions, children, leading_slice_transfer
from inferno.search.random_sampling import scale_spec
from inferno.search.supernet import ElasticMicroCNN
from inferno.tracking import read_points

X = torch.zeros(1, 1, 28, 28)


def by_move(kids, move):
    return [k for k in kids if k.move == move]


def test_children_costs_equal_their_architectures():
    parent = MicroCNN(3, 2, 2, 16, in_channels=1)
    kids = children(parent, ["drop_stage", "drop_block", "narrow"], MoveOptions(X, narrow_ratio=0.25))
    assert [k.move for k in kids] == ["drop_stage", "drop_block"] + ["narrow"] * 4  # stem + 3 stages
    expected = {
        "drop_stage": MicroCNN(2, 2, 2, 16, in_channels=1),  # B-1
        "drop_block": MicroCNN(3, 1, 2, 16, in_channels=1),  # D-1 in every stage
    }
    for move, ref in expected.items():
        (kid,) = by_move(kids, move)
        assert count_params(kid.net) == count_params(ref) and count_macs(kid.net, X) == count_macs(ref, X)
    stem, *stages = by_move(kids, "narrow")
    assert stem.detail["stage"] == "stem" and stem.net.spec() == {**parent.spec(), "stem": 12}
    for i, kid in enumerate(stages):  # a quarter of stage i's channels (mid, out, SE) removed
        widths = [0.75 if j == i else 1.0 for j in range(3)]
        ref = MicroCNN(spec=scale_spec(parent.spec(), [2, 2, 2], widths), in_channels=1)
        assert kid.net.spec() == ref.spec()
        assert count_params(kid.net) == count_params(ref) and count_macs(kid.net, X) == count_macs(ref, X)


def test_resnet20_supports_the_same_moves():
    parent = ResNet20(in_channels=1)
    kids = children(parent, ["drop_stage", "drop_block", "narrow"], MoveOptions(X))
    assert count_params(by_move(kids, "drop_stage")[0].net) == count_params(ResNet20(depth=[3, 3], in_channels=1))
    assert count_params(by_move(kids, "drop_block")[0].net) == count_params(ResNet20(depth=2, in_channels=1))
    for k in kids:
        assert k.net(X).shape == (1, 10)


def test_importance_transfer_keeps_exactly_the_top_l1_channels():
    torch.manual_seed(0)
    parent = MicroCNN(2, 2, 1, 16, in_channels=1)
    for m in parent.modules():  # make BN weights non-trivial so they matter in the score
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-1, 1)
    (kid,) = [k for k in children(parent, ["narrow"], MoveOptions(X, narrow_ratio=0.5)) if k.detail["stage"] == 0]
    kept = kid.detail["kept"]
    p, c = parent.stages[0][0], kid.net.stages[0][0]
    k1, k2 = kept["stages.0.0.conv1"], kept["stages.0.0.conv2"]
    # the rule computed here: group score = mean over the group's members of each channel's L1 norm
    # (conv1's filter, bn1's scale, conv2's input slice); keep the top half
    score = (p.conv1.weight.abs().sum((1, 2, 3)) + p.bn1.weight.abs() + p.conv2.weight.abs().sum((0, 2, 3))) / 3
    assert k1 == sorted(torch.topk(score, 2).indices.tolist())
    # the child carries exactly those channels
    assert torch.equal(c.conv1.weight, p.conv1.weight[k1])
    assert torch.equal(c.bn1.running_mean, p.bn1.running_mean[k1])
    assert torch.equal(c.conv2.weight, p.conv2.weight[k2][:, k1])


def test_leading_slice_transfer_copies_the_leading_block():
    torch.manual_seed(0)
    parent = MicroCNN(2, 2, 1, 16, in_channels=1)
    kids = children(parent, ["narrow"], MoveOptions(X, narrow_ratio=0.5), transfer="leading_slice")
    c, p = kids[1].net.stages[0][0], parent.stages[0][0]
    m = c.conv1.weight.shape[0]
    assert torch.equal(c.conv1.weight, p.conv1.weight[:m])
    assert torch.equal(c.conv2.weight, p.conv2.weight[:m, :m])
    fresh = MicroCNN(1, 1, 1, 8, in_channels=1)
    leading_slice_transfer(parent, fresh)
    assert torch.equal(fresh.stem[0].weight, parent.stem[0].weight[:8])


def test_elastic_supernet_computes_exactly_its_extracted_subnetwork():
    torch.manual_seed(0)
    sn = ElasticMicroCNN(spec=MicroCNN(3, 2, 2, 16).spec(), in_channels=1, num_classes=10, stem_stride=1)
    for m in sn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    sn.eval()
    x = torch.randn(4, 1, 28, 28)
    archs = ({"depths": [2, 1], "widths": [0.5, 0.75], "stem": 0.5}, {"depths": [1, 2, 1], "widths": [1.0, 0.5, 0.75]}, None)
    for arch in archs:
        sn.set_active(arch)
        sub = sn.extract(arch).eval()
        assert torch.allclose(sn(x), sub(x), atol=1e-5)
        if arch:
            assert sub.spec() == scale_spec(sn.spec(), **arch)


FAST = ["model.stages=2", "model.depth=2", "model.width=1", "model.base_channels=16", "train.dense_epochs=2",
        "hardware.limit_batches=4", "hardware.latency_repeats=1", "hardware.latency_batch_size=8", "hardware.progress_bar=false", "logger=none"]


def test_greedy_stays_within_budget_and_resumes_bit_identically(compose_cfg, tmp_path):
    common = [*FAST, "pruner=greedy_layerwise", "pruner.budget.macs=0.4", "pruner.scratch_epochs=1",
              "pruner.final_epochs=1"]
    full = compose_cfg(*common, f"paths.state_dir={tmp_path / 'state_a'}")
    run(full, tmp_path / "a")
    rows = read_points(tmp_path / "a" / "points.csv")
    dense = rows[0]
    final = [r for r in rows if r.get("phase") == "final"]
    assert len(final) == 1 and int(final[0]["macs"]) <= 0.4 * int(dense["macs"])
    search = [r for r in rows[1:] if r["phase"] != "scratch_control"]
    assert int(final[0]["train_samples"]) == int(dense["train_samples"]) + sum(int(r["own_samples"]) for r in search)
    control = next(r for r in rows if r["phase"] == "scratch_control")
    assert control["params"] == final[0]["params"] and int(control["train_samples"]) == int(control["own_samples"])
    steps = {int(r["step"]) for r in rows if r.get("phase") == "child"}
    assert steps == set(range(1, max(steps) + 1)) and max(steps) >= 2

    # crash after the first step, rerun the same command: same points, bit-identical final weights
    crashed = compose_cfg(*common, f"paths.state_dir={tmp_path / 'state_b'}", "pruner.stop_after=1")
    with pytest.raises(SearchInterrupted):
        run(crashed, tmp_path / "b1")
    run(compose_cfg(*common, f"paths.state_dir={tmp_path / 'state_b'}"), tmp_path / "b2")
    a, b = load_file(tmp_path / "a" / "greedy_final.safetensors"), load_file(tmp_path / "b2" / "greedy_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = read_points(tmp_path / "b2" / "points.csv")
    assert [(r["method"], r["step"], r["params"], r["value"]) for r in resumed] == [
        (r["method"], r["step"], r["params"], r["value"]) for r in rows
    ]  # the scratch control included: its initialisation is seeded by its place, not by the process


def test_random_sampling_cost_is_the_sum_over_samples(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "pruner=random_sampling", "pruner.epochs=1", "pruner.total_samples=1000",
                      "pruner.budget.macs=0.6", f"paths.state_dir={tmp_path / 's'}")
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert {r["method"] for r in rows} == {"random_sampling"}
    own = [int(r["own_samples"]) for r in rows]
    assert own == [4 * 64] * 3  # 4 batches of 64 per epoch; a 4th sample would pass 1000
    assert [int(r["train_samples"]) for r in rows] == [256, 512, 768]
    dense_macs = count_macs(MicroCNN(2, 2, 1, 16, in_channels=1), torch.zeros(1, 1, 8, 8))
    assert all(int(r["macs"]) <= 0.6 * dense_macs for r in rows)


def test_compare_matches_random_sampling_to_greedy_cost(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "pruner=compare", "pruner.budget.macs=0.5", "pruner.methods.uniform.ratios=[0.5]",
                      "pruner.methods.greedy_thesis=null", "pruner.methods.grid=null", "pruner.objective=greedy_layerwise",
                      "pruner.methods.random_sampling.match.method=greedy_layerwise",
                      "pruner.methods.uniform.finetune_epochs=1", "pruner.methods.greedy_layerwise.final_epochs=1",
                      "pruner.methods.greedy_layerwise.scratch_control=false",
                      "pruner.methods.random_sampling.epochs=1", "pruner.methods.random_sampling.max_samples=100", "pruner.methods.random_sampling.match.multiple=2",
                      "pruner.methods.supernet.depth_epochs=1", "pruner.methods.supernet.width_epochs=1",
                      "pruner.methods.supernet.candidates=3", "pruner.methods.supernet.finetune_epochs=1",
                      f"paths.state_dir={tmp_path / 's'}")
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    methods = [r["method"] for r in rows]
    assert methods[0] == "dense" and methods.count("dense") == 1
    assert {"greedy_layerwise", "random_sampling", "supernet", "uniform"} <= set(methods)
    greedy_total = int(next(r for r in rows if r.get("phase") == "final")["train_samples"])
    random_rows = [r for r in rows if r["method"] == "random_sampling"]
    assert int(random_rows[-1]["train_samples"]) <= 2 * greedy_total < int(random_rows[-1]["train_samples"]) + 256
    sn = [r for r in rows if r["method"] == "supernet"]
    assert len(sn) == 1 and int(sn[0]["macs"]) <= 0.5 * int(rows[0]["macs"])
    # supernet's cost = start model + both shrinking phases (1 epoch each) + fine-tuning
    assert int(sn[0]["train_samples"]) == int(rows[0]["train_samples"]) + 3 * 256
    # every search's budget is relative to the start model, whatever ran before it
    states = [json.loads(p.read_text())["state"] for p in (tmp_path / "s").glob("*/state.json")]
    assert len(states) == 3 and all(st["limits"] == {"macs": 0.5 * int(rows[0]["macs"])} for st in states)
    # the same command again: finished searches are replayed, not rerun; the points are the same
    run(cfg, tmp_path / "again")
    again = read_points(tmp_path / "again" / "points.csv")
    assert [(r["method"], r["step"], r["params"], r["value"], r["train_samples"]) for r in again] == [
        (r["method"], r["step"], r["params"], r["value"], r["train_samples"]) for r in rows
    ]


def test_taylor_importance_runs_through_the_graph():
    net = MicroCNN(2, 1, 1, 16, in_channels=1)
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    kids = children(net, ["narrow"], MoveOptions(X, importance="taylor", calib_batch=batch))
    assert len(kids) == 3 and all(isinstance(k.detail["kept"], dict) for k in kids)
    assert tp is not None


def test_budget_fractions_and_absolute_limits():
    from inferno.errors import ConfigError
    from inferno.search.loop import Budget

    start = {"macs": 1000.0, "params": 200.0, "latency_ms": 4.0}
    limits = Budget(macs=0.5, params=150).limits(start)
    assert limits == {"macs": 500.0, "params": 150}
    assert Budget.fits({"macs": 500, "params": 150}, limits) and not Budget.fits({"macs": 501, "params": 10}, limits)
    with pytest.raises(ConfigError, match="pruner.budget.macs"):
        Budget(macs=-1)


def test_efficiency_selection_prefers_accuracy_per_cost_removed():
    from types import SimpleNamespace

    from inferno.search.greedy import GreedyLayerwise

    g = GreedyLayerwise(budget={"macs": 0.5}, select="efficiency")
    state = {"start": {"macs": 100}, "current": {"macs": 100, "val": 0.9}}
    cheap_drop = SimpleNamespace(macs=90, extra={"val_value": 0.89})  # -0.01 for 10 % of MACs: -0.1 per unit
    big_cut = SimpleNamespace(macs=50, extra={"val_value": 0.87})  # -0.03 for 50 %: -0.06 per unit
    assert g.score(big_cut, state) > g.score(cheap_drop, state)
    assert GreedyLayerwise(budget={"macs": 0.5}).score(cheap_drop, state) == 0.89
