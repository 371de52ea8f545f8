"""pruner=uniform: Torch-Pruning's own pruner, per-layer and global ranking, iterative steps, option checks."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from inferno.config import build
from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.pruning.cnn.uniform import ChannelPruner, UniformPruner
from inferno.run import run
from inferno.tracking import read_points

X = torch.zeros(1, 1, 8, 8)


def microcnn(seed: int = 0) -> MicroCNN:
    """MicroCNN(2, 2, 1, 16) with non-trivial BatchNorms (weights, biases, running statistics), in eval mode."""
    torch.manual_seed(seed)
    net = MicroCNN(2, 2, 1, 16, in_channels=1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.8)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def removed_count(n: int, ratio: float, round_to: int | None = None) -> int:
    """Torch-Pruning's rule for one group of ``n`` channels: keep ``int(n * (1 - ratio))``, rounded down to a
    multiple of ``round_to``; a group of one channel, or one that would keep none, is left whole."""
    keep = int(n * (1 - ratio))
    if n == 1 or keep == n:
        return 0
    if round_to:
        keep -= keep % round_to
    return 0 if keep <= 0 else n - keep


def groups(net: nn.Module) -> dict:
    """{root layer name: group} of the unpruned ``net`` (head ignored), from a fresh dependency graph."""
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=X)
    names = {m: n for n, m in net.named_modules()}
    return {names[g[0].dep.target.module]: g for g in graph.get_all_groups(ignored_layers=list(net.head.modules()))}


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True)[:k].tolist())


def l1_out(w):  # L1 norm of every output channel's filter
    return w.abs().flatten(1).sum(1)


def l1_in(w):  # L1 norm of every input channel's column
    return w.abs().transpose(0, 1).flatten(1).sum(1)


def hand_l1_group_scores(net: MicroCNN) -> dict[str, torch.Tensor]:
    """The group L1 score (mean over the group's layers of each channel's L1 slice), computed by hand for the
    groups that are a short chain: the stem (conv, BN, both consumers of stage 0 block 0) and every block's
    conv1 -> bn1 -> conv2 and conv2 -> bn2 -> conv3."""
    d = net.stem[0].weight.detach()
    b0 = net.stages[0][0]
    out = {"stem.0": (l1_out(d) + net.stem[1].weight.abs() + l1_in(b0.shortcut[0].weight) + l1_in(b0.conv1.weight)) / 4}
    for i, stage in enumerate(net.stages):
        for j, blk in enumerate(stage):
            out[f"stages.{i}.{j}.conv1"] = (l1_out(blk.conv1.weight) + blk.bn1.weight.abs() + l1_in(blk.conv2.weight)) / 3
            out[f"stages.{i}.{j}.conv2"] = (l1_out(blk.conv2.weight) + blk.bn2.weight.abs() + l1_in(blk.conv3.weight)) / 3
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("ratio, round_to", [(0.3, None), (0.5, None), (0.3, 4)])
def test_per_layer_l1_keeps_each_groups_top_channels(ratio, round_to):
    net = microcnn()
    ref = copy.deepcopy(net)
    hand = hand_l1_group_scores(ref)
    tp_scores = {name: tp.importance.MagnitudeImportance(p=1)(g) for name, g in groups(ref).items()}
    pruner = ChannelPruner(net, X, ratio, "l1", round_to=round_to)
    kept = pruner.step()
    assert set(kept) == set(tp_scores) and len(kept) == 15  # stem, 2 residual streams, 3 per block (mid, mid, SE)
    for name, scores in tp_scores.items():
        n = len(scores)
        assert pruner.initial[name] == n
        k = n - removed_count(n, ratio, round_to)
        assert len(kept[name]) == k, name
        assert kept[name] == top(scores, k), name  # Torch-Pruning's scores recomputed on the unpruned model
        if name in hand:  # and the same channels by the hand-computed group L1 norm
            assert torch.allclose(hand[name] / hand[name].mean(), scores, atol=1e-5), name
            assert kept[name] == top(hand[name], k), name
    if ratio == 0.3 and round_to is None:  # keep int(n * 0.7): 16 -> 11, 32 -> 22, 8 -> 5, 4 -> 2 (not 3), 2 -> 1
        assert net.spec()["stem"] == 11 and net.stages[0][0].conv1.out_channels == 2
        assert net.stages[1][0].conv3.out_channels == 22 and net.stages[1][1].conv2.out_channels == 5
        assert net.stages[1][0].se.reduce.out_channels == 1 and net.stages[0][0].se.reduce.out_channels == 1
    if round_to == 4:  # kept rounded down to multiples of 4: 11 -> 8, 22 -> 20, 5 -> 4; the 4-wide groups stay whole
        assert net.spec()["stem"] == 8 and net.stages[1][0].conv3.out_channels == 20
        assert net.stages[1][0].conv1.out_channels == 4 and net.stages[0][0].conv1.out_channels == 4
    assert net.head.out_features == 10  # the head is never pruned
    # the pruned weights are the kept slices of the original ones
    assert torch.equal(net.stem[0].weight, ref.stem[0].weight[kept["stem.0"]])
    assert torch.equal(net.stages[1][1].conv2.weight,
                       ref.stages[1][1].conv2.weight[kept["stages.1.1.conv2"]][:, kept["stages.1.1.conv1"]])


def test_filter_l1_ranks_by_the_root_filters_alone():
    net = microcnn(1)
    ref = copy.deepcopy(net)
    kept = ChannelPruner(net, X, 0.5, "filter_l1").step()
    modules = dict(ref.named_modules())
    for name, k in kept.items():
        n = modules[name].out_channels
        assert k == top(l1_out(modules[name].weight.detach()), n - removed_count(n, 0.5)), name


def masked_reference(ref: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """The unpruned network with every consumer's input columns of the removed channels set to zero."""
    masked = copy.deepcopy(ref)
    graph = tp.DependencyGraph().build_dependency(masked, example_inputs=X)
    names = {m: n for n, m in masked.named_modules()}
    with torch.no_grad():
        for g in graph.get_all_groups(ignored_layers=list(masked.head.modules())):
            root, handler = g[0].dep.target.module, g[0].dep.handler
            drop = [c for c in range(len(g[0].idxs)) if c not in set(kept[names[root]])]
            if not drop:
                continue
            for dep, idxs in graph.get_pruning_group(root, handler, drop):
                if dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                    dep.target.module.weight[:, idxs] = 0
    return masked


@pytest.mark.parametrize("global_pruning, steps", [(False, 1), (True, 2)])
def test_pruned_network_computes_the_masked_network(global_pruning, steps):
    net = microcnn(2)
    ref = copy.deepcopy(net)
    pruner = ChannelPruner(net, X, 0.5, "l1", global_pruning=global_pruning, iterative_steps=steps)
    for _ in range(steps):
        kept = pruner.step()
    x = torch.randn(4, 1, 8, 8)
    masked = masked_reference(ref, kept)
    with torch.no_grad():
        out, want, dense = net(x), masked(x), ref(x)
    assert not torch.allclose(want, dense, atol=1e-3)  # the mask changes the function...
    assert torch.allclose(out, want, atol=1e-5)  # ...and the physically pruned network computes exactly that


@pytest.mark.parametrize("seed, collapsed", [(0, []), (3, ["stages.1.1.se.reduce"])])
def test_global_ranking_differs_per_layer_with_the_same_total(seed, collapsed):
    ratio = 0.5
    local_net, global_net = microcnn(seed), microcnn(seed)
    scores = {name: tp.importance.MagnitudeImportance(p=1)(g) for name, g in groups(copy.deepcopy(local_net)).items()}
    local = ChannelPruner(local_net, X, ratio, "l1")
    glob = ChannelPruner(global_net, X, ratio, "l1", global_pruning=True)
    local.step(), glob.step()
    lr, gr = local.layer_ratios(), glob.layer_ratios()
    prunable = [n for n, s in scores.items() if len(s) > 1]  # one-channel SE groups are never pruned
    assert all(lr[n] == 0.5 for n in prunable)
    assert len({round(gr[n], 4) for n in prunable}) >= 3  # different ratios per layer
    # global: the int(total * ratio)-th lowest (group-mean-normalised) score over all groups is the threshold; every
    # channel at or below it goes, except that a group that would lose every channel is left whole
    total = sum(len(scores[n]) for n in prunable)
    threshold = torch.cat([scores[n] for n in prunable]).sort().values[total - int(total * (1 - ratio)) - 1]
    expected = {n: [c for c in range(len(scores[n])) if scores[n][c] > threshold] for n in prunable}
    assert [n for n in prunable if not expected[n]] == collapsed
    for n in prunable:
        assert glob.kept[n] == (expected[n] or list(range(len(scores[n])))), n
    removed_global = sum(len(scores[n]) - len(glob.kept[n]) for n in scores)
    removed_local = sum(len(scores[n]) - len(local.kept[n]) for n in scores)
    assert removed_local == total - int(total * (1 - ratio)) == 58
    assert removed_global == removed_local - sum(len(scores[n]) for n in collapsed)  # the same total unless collapsed
    assert global_net(X).shape == (1, 10)


def test_iterative_steps_follow_the_linear_schedule():
    net = microcnn(4)
    pruner = ChannelPruner(net, X, 0.5, "l2", iterative_steps=2)
    pruner.step()
    assert pruner.step_ratio() == 0.25 and net.spec()["stem"] == 12 and net.stages[1][0].conv3.out_channels == 24
    pruner.step()
    assert pruner.step_ratio() == 0.5 and net.spec()["stem"] == 8 and net.stages[1][0].conv3.out_channels == 16
    with pytest.raises(RuntimeError):
        pruner.step()


FAST = ["task=digits", "model.stages=2", "model.depth=1", "model.width=1", "model.base_channels=16",
        "train.dense_epochs=1", "hardware.limit_batches=2", "hardware.latency_repeats=1",
        "hardware.latency_batch_size=8", "hardware.progress_bar=false", "logger=none"]


def test_cli_run_writes_uniform_points_with_iterative_taylor(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST, "pruner=uniform", "pruner.ratios=[0.25,0.5]", "pruner.importance=taylor",
                      "pruner.iterative_steps=2", "pruner.step_epochs=1", "pruner.finetune_epochs=1",
                      "pruner.taylor_samples=40", "pruner.record_steps=true")
    objective = run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert [r["method"] for r in rows] == ["dense"] + ["uniform"] * 4
    dense, uni = rows[0], rows[1:]
    assert [r["phase"] for r in uni] == ["step", "final"] * 2 and [int(r["step"]) for r in uni] == [1, 2, 3, 4]
    assert [float(r["ratio"]) for r in uni] == [0.25, 0.25, 0.5, 0.5]
    assert [float(r["step_ratio"]) for r in uni] == [0.125, 0.25, 0.25, 0.5]
    assert {(r["importance"], r["global_pruning"], r["steps"]) for r in uni} == {("taylor", "False", "2")}
    assert all("variant" not in r or not r["variant"] for r in uni)
    # cost: the start model's + 40 gradient examples per step + 2 batches of 64 per epoch of fine-tuning
    start = int(dense["train_samples"])
    assert [int(r["train_samples"]) - start for r in uni] == [40 + 128, 80 + 256] * 2
    assert [int(r["grad_samples"]) for r in uni] == [40, 80] * 2
    assert int(uni[1]["macs"]) < int(dense["macs"]) and int(uni[3]["macs"]) < int(uni[1]["macs"])
    assert float(uni[3]["channel_ratio"]) > 0.4
    assert objective == max(float(r["value"]) for r in uni if r["phase"] == "final")


def test_presets_compose_and_build(compose_cfg):
    p = build(compose_cfg("pruner=uniform"), "pruner")
    assert (p.method, p.label, p.ratios, p.importance, p.global_pruning, p.iterative_steps) == (
        "uniform", "uniform", [0.25, 0.5, 0.75], "l1", False, 1)
    cfg = compose_cfg("pruner=torch_pruning")
    p = build(cfg, "pruner")
    assert cfg.pruner.kinds == ["vision"] and (p.method, p.label, p.importance, p.iterative_steps) == (
        "uniform", "uniform[global]", "group_norm", 3)
    cmp = build(compose_cfg("pruner=compare", "pruner.methods.uniform.ratios=[0.5]",
                            "pruner.methods.uniform.global_pruning=true"), "pruner")
    assert cmp.methods["uniform"].ratios == [0.5] and cmp.methods["uniform"].label == "uniform[global]"


@pytest.mark.parametrize("override, message", [
    ("pruner.importance=l3", ("pruner.importance: unknown importance 'l3'; allowed: l1, l2, group_norm, filter_l1, "
                              "filter_l2, taylor, random")),
    ("pruner.ratios=[0.5,1.0]", "pruner.ratios: ratio 1.0 is outside [0, 1)"),
    ("pruner.ratios=[-0.1]", "pruner.ratios: ratio -0.1 is outside [0, 1)"),
    ("pruner.ratios=[]", "pruner.ratios: [] must be a non-empty list of ratios in [0, 1)"),
    ("pruner.iterative_steps=0", "pruner.iterative_steps: 0 must be an integer >= 1"),
    ("pruner.iterative_steps=1.5", "pruner.iterative_steps: 1.5 must be an integer >= 1"),
    ("pruner.round_to=0", "pruner.round_to: 0 must be an integer >= 1 or null"),
    ("pruner.finetune_epochs=-1", "pruner.finetune_epochs: -1 must be a whole number of epochs >= 0 or a fraction below 1"),
    ("pruner.step_epochs=1.5", "pruner.step_epochs: 1.5 must be a whole number of epochs >= 0 or a fraction below 1"),
    ("pruner.global_pruning=maybe", "pruner.global_pruning: 'maybe' must be true or false"),
    ("pruner.taylor_samples=0", "pruner.taylor_samples: 0 must be an integer >= 1"),
])
def test_bad_options_fail_before_training(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(*FAST, "pruner=uniform", override)
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "points.csv").exists()  # refused before the start model trained


def test_accepted_edge_values():
    p = UniformPruner(ratios=[0, 0.99], finetune_epochs=0.5, step_epochs=0, round_to=8, iterative_steps=4)
    assert p.ratios == [0.0, 0.99] and p.round_to == 8
    with pytest.raises(ConfigError, match=r"^pruner.method: "):
        UniformPruner(method="")
