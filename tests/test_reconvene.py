"""pruner=reconvene: SNIP and SynFlow scores against independent computations on a tiny net, SynFlow's closed form on
a linear chain, the iterative schedule, the sensitivity and selection rules, the structured model against its plan
(parameter count, kept channels, sliced masks, re-initialisation), the CLI run and its errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.masks import is_masked, prunable_layers, weight_of
from inferno.pruning.cnn.pai import SynFlow, keep_count, snip_masks, snip_scores, synflow_masks, synflow_schedule
from inferno.pruning.cnn.reconvene import (
    ReconvenePruner,
    build_units,
    planned_params,
    select_units,
    set_sensitivities,
    structured_model,
)
from inferno.pruning.cnn.surgery import channel_groups
from inferno.run import run
from inferno.tracking import read_points

LAYERS = ["conv1", "conv2", "head"]


class Tiny(nn.Module):
    """conv(1->4, pad 1) -> BN -> ReLU -> conv(4->6) -> BN -> ReLU -> mean pool -> linear(6->3)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    net = Tiny()
    g = torch.Generator().manual_seed(seed + 1)
    for bn in (net.bn1, net.bn2):  # non-trivial affine parameters and statistics (some negative, for |.|)
        n = bn.num_features
        bn.weight.data = torch.randn(n, generator=g)
        bn.bias.data = torch.randn(n, generator=g)
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return net


def functional(p: dict, x: torch.Tensor, train: bool) -> torch.Tensor:
    """The Tiny net written out with torch.nn.functional on a flat parameter dict."""
    def bn(h, k):
        if train:
            return F.batch_norm(h, None, None, p[f"{k}.weight"], p[f"{k}.bias"], training=True, eps=1e-5)
        return F.batch_norm(h, p[f"{k}.running_mean"], p[f"{k}.running_var"], p[f"{k}.weight"], p[f"{k}.bias"],
                            training=False, eps=1e-5)
    h = F.relu(bn(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1), "bn1"))
    h = F.relu(bn(F.conv2d(h, p["conv2.weight"], p["conv2.bias"]), "bn2"))
    return F.linear(h.mean((2, 3)), p["head.weight"], p["head.bias"])


# ----------------------------------------------------------------------------------- SNIP
def test_snip_scores_equal_an_independent_gradient():
    net = tiny()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 1, 6, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    before = copy.deepcopy(net.state_dict())
    scores = snip_scores(net, LAYERS, x, y, batch_size=64)

    p = {k: v.detach().clone().requires_grad_(k.endswith(".weight")) for k, v in net.state_dict().items()}
    loss = F.cross_entropy(functional(p, x, train=True), y)
    grads = torch.autograd.grad(loss, [p[f"{n}.weight"] for n in LAYERS])
    for n, gr in zip(LAYERS, grads):
        torch.testing.assert_close(scores[n], (p[f"{n}.weight"].detach() * gr).abs(), rtol=1e-5, atol=1e-8)
    for k, v in net.state_dict().items():  # the network itself (running statistics included) is untouched
        assert torch.equal(v, before[k]), k

    masks = snip_masks(scores, 0.25)
    flat = torch.cat([scores[n].flatten() for n in LAYERS])
    keep = keep_count(0.25, flat.numel())
    threshold = flat.sort(descending=True).values[keep - 1]
    for n in LAYERS:
        assert torch.equal(masks[n], scores[n] >= threshold)
    assert sum(int(m.sum()) for m in masks.values()) == keep


# ----------------------------------------------------------------------------------- SynFlow
def synflow_independent(net: Tiny, masks: dict | None) -> dict:
    """|theta * dR/dtheta|, R = sum of the all-|.| double network (eval BN on |running stats|) on an all-ones input."""
    p = {k: v.detach().double().abs() for k, v in net.state_dict().items() if v.is_floating_point()}
    for n in LAYERS:
        if masks is not None:
            p[f"{n}.weight"] = p[f"{n}.weight"] * masks[n].double()
        p[f"{n}.weight"].requires_grad_(True)
    r = functional(p, torch.ones(1, 1, 6, 6, dtype=torch.float64), train=False).sum()
    grads = torch.autograd.grad(r, [p[f"{n}.weight"] for n in LAYERS])
    return {n: (p[f"{n}.weight"].detach() * g).abs() for n, g in zip(LAYERS, grads)}


def test_synflow_scores_equal_an_independent_computation():
    net = tiny(3)
    flow = SynFlow(net, LAYERS, (1, 6, 6), double=True)
    got, want = flow.scores(), synflow_independent(net, None)
    for n in LAYERS:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(getattr(net, n).weight.shape, generator=g) < 0.5 for n in LAYERS}
    got, want = flow.scores(masks), synflow_independent(net, masks)
    for n in LAYERS:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
        assert not got[n][~masks[n]].any()  # a pruned weight scores 0


def test_synflow_on_a_linear_chain_has_its_closed_form():
    """R = 1^T |W2| |W1| 1, so score(W1[i, j]) = |W1[i, j]| * sum_k |W2[k, i]| and score(W2[k, i]) =
    |W2[k, i]| * sum_j |W1[i, j]|."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    s = SynFlow(net, ["0", "2"], (5,), double=True).scores()
    w1, w2 = net[0].weight.detach().double().abs(), net[2].weight.detach().double().abs()
    torch.testing.assert_close(s["0"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(s["2"], w2 * w1.sum(1)[None, :])


def test_synflow_iterates_the_exponential_schedule():
    net = tiny(7)
    density, rounds = 0.1, 6
    schedule = synflow_schedule(density, rounds)
    assert schedule == pytest.approx([density ** (k / rounds) for k in range(1, rounds + 1)])
    assert schedule[-1] == pytest.approx(density)
    masks, _ = synflow_masks(net, LAYERS, (1, 6, 6), density, rounds)

    total = sum(getattr(net, n).weight.numel() for n in LAYERS)
    want = None
    for k in range(1, rounds + 1):  # independent loop: rescore with the pruned weights at zero, keep the top
        scores = synflow_independent(net, want)
        flat = torch.cat([scores[n].flatten() for n in LAYERS])
        if want is not None:
            alive = torch.cat([want[n].flatten() for n in LAYERS])
            flat = torch.where(alive, flat, torch.full_like(flat, -math.inf))
        keep = max(1, round(density ** (k / rounds) * total))
        top = torch.zeros(flat.numel(), dtype=torch.bool)
        top[flat.topk(keep).indices] = True
        want, start = {}, 0
        for n in LAYERS:
            size = getattr(net, n).weight.numel()
            want[n] = top[start:start + size].view_as(getattr(net, n).weight)
            start += size
    for n in LAYERS:
        assert torch.equal(masks[n], want[n]), n
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)


# ----------------------------------------------------------------------------------- units, selection, the plan
FAMILIES = {"resnet20": lambda: ResNet20(2, 8, in_channels=1), "microcnn": lambda: MicroCNN(2, 2, 1, 16, in_channels=1)}


def pai(family: str, density: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    net = FAMILIES[family]().eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    layers = list(prunable_layers(net, include_head=True))
    scores = snip_scores(net, layers, x, y)
    masks = snip_masks(scores, density)
    example = torch.randn(2, 1, 16, 16, generator=g)
    _, groups = channel_groups(net, example)
    return net, example, scores, masks, groups


@pytest.mark.parametrize("family", ["resnet20", "microcnn"])
def test_sparsity_sensitivity_and_selection_follow_the_rule(family):
    _net, _, scores, masks, groups = pai(family)
    units = build_units(groups, masks, scores)
    assert units
    global_density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    set_sensitivities(units, "sparsity", global_density, masks)
    for u in units:  # the unit's surviving fraction over its producers, relative to the network's
        kept = sum(int(masks[n].sum()) for n, _, _ in u.group.producers)
        total = sum(masks[n].numel() for n, _, _ in u.group.producers)
        assert u.sensitivity == pytest.approx(kept / total / global_density)
        n = u.group.size
        assert len(u.keep) == min(n, max(1, round(kept / total * n)))
        mass = torch.zeros(n, dtype=torch.float64)
        for name, _, idxs in u.group.producers:
            mass += (scores[name].double() * masks[name]).flatten(1).sum(1)[idxs]
        assert all(mass[j] >= mass[i] for j in u.keep for i in u.drop)  # the most surviving mass kept
    below = select_units(units, threshold=1.0)
    assert {u.root for u in below} == {u.root for u in units if u.sensitivity < 1.0 and u.drop}
    half = select_units(units, fraction=0.5)
    ranked = sorted([u for u in units if u.drop], key=lambda u: u.sensitivity)
    assert [u.root for u in half] == [u.root for u in ranked[:math.ceil(0.5 * len(units))]]


@pytest.mark.parametrize("family", ["resnet20", "microcnn"])
@pytest.mark.parametrize("reinit", ["none", "affected"])
def test_structured_model_matches_its_plan(family, reinit):
    net, example, scores, masks, groups = pai(family)
    units = build_units(groups, masks, scores)
    global_density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    set_sensitivities(units, "sparsity", global_density, masks)
    selected = select_units(units, fraction=0.5)
    assert selected
    out = structured_model(net, example, masks, selected, keep_masks=True, reinit=reinit, seed=0)
    plan = planned_params(net, groups, {u.root: len(u.drop) for u in selected})
    assert sum(p.numel() for p in out.parameters()) == plan < sum(p.numel() for p in net.parameters())
    out(example)  # still runs

    # independent bookkeeping: which output / input channels of each layer survive
    keep_out, keep_in = {}, {}
    for u in selected:
        for name, _, idxs in u.group.producers:
            keep_out.setdefault(name, set()).update(idxs[j] for j in u.drop)
        for name, _, idxs in u.group.consumers:
            keep_in.setdefault(name, set()).update(idxs[j] for j in u.drop)
    producers = {name for u in selected for name, _, _ in u.group.producers}
    old, new = dict(net.named_modules()), dict(out.named_modules())
    for name in masks:
        w_old = old[name].weight.detach()
        rows = [i for i in range(w_old.shape[0]) if i not in keep_out.get(name, set())]
        cols = [i for i in range(w_old.shape[1]) if i not in keep_in.get(name, set())]
        layer = new[name]
        assert tuple(weight_of(layer).shape[:2]) == (len(rows), len(cols)), name
        if name in producers:
            assert not is_masked(layer)  # made structured: its kept filters are whole
        else:
            sliced = masks[name][rows][:, cols]
            if bool(sliced.all()):
                assert not is_masked(layer)
            else:
                assert torch.equal(layer.weight_mask.bool(), sliced), name  # the unstructured mask, sliced
        changed = (len(rows), len(cols)) != tuple(w_old.shape[:2])
        original = getattr(layer, "weight_orig", layer.weight).detach()
        if reinit == "none" or not changed:
            assert torch.equal(original, w_old[rows][:, cols]), name  # the initial values, sliced
        else:
            assert not torch.equal(original, w_old[rows][:, cols]), name  # re-initialised
    for u in selected:
        kept = len(u.keep)
        assert kept == min(u.group.size, max(1, round(u.density * u.group.size)))
        for name, _, _ in u.group.producers:
            assert new[name].weight.shape[0] == old[name].weight.shape[0] - len(u.drop)


# ----------------------------------------------------------------------------------- CLI
FAST = ["task=digits", "model.stages=2", "model.depth=1", "model.width=1", "model.base_channels=16",
        "train.dense_epochs=1", "hardware.limit_batches=3", "hardware.latency_repeats=1",
        "hardware.latency_batch_size=8", "hardware.progress_bar=false", "logger=none"]


def test_cli_run_records_structured_and_unstructured_points(compose_cfg, tmp_path, shared_data):
    cfg = compose_cfg(*FAST, "pruner=reconvene", "pruner.densities=[0.2]", "pruner.synflow_rounds=5",
                      "pruner.snip_samples=32", "pruner.structured_fraction=0.5")
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert [r["method"] for r in rows] == ["dense"] + ["reconvene"] * 4
    assert [r["variant"] for r in rows[1:]] == ["snip_structured", "snip_unstructured", "synflow_structured",
                                                "synflow_unstructured"]
    dense = int(rows[0]["params"])
    net = MicroCNN(2, 1, 1, 16, in_channels=1)
    total = sum(m.weight.numel() for m in prunable_layers(net, include_head=True).values())
    for r in rows[1:]:
        assert float(r["prune_s"]) > 0
        if r["structure"] == "structured":
            assert int(r["params"]) == int(float(r["planned_params"])) < dense
            assert int(r["structured_layers"]) > 0
            assert float(r["compression"]) == pytest.approx(dense / int(r["params"]), rel=1e-3)
        else:
            assert int(r["params"]) == dense
            assert abs(float(r["achieved_density"]) - 0.2) <= 1 / total
        assert int(r["nonzero_params"]) < dense
        assert float(r["sparsity"]) == pytest.approx(1 - int(r["nonzero_params"]) / dense, abs=1e-6)
    assert int(rows[1]["train_samples"]) == int(rows[2]["train_samples"])  # the same recipe (and SNIP's 32)


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    ({"scores": ["grasp"]}, r"pruner.scores: .*grasp.*snip, synflow"),
    ({"scores": []}, "pruner.scores"),
    ({"scores": ["snip", "snip"]}, "names a score twice"),
    ({"densities": [0.0]}, r"pruner.densities: density 0.0 is outside \(0, 1\]"),
    ({"densities": [1.5]}, "pruner.densities"),
    ({"densities": ["a"]}, "pruner.densities"),
    ({"sensitivity": "hessian"}, "pruner.sensitivity"),
    ({"threshold": 0}, "pruner.threshold"),
    ({"structured_fraction": 1.5}, "pruner.structured_fraction"),
    ({"reinit": "zero"}, "pruner.reinit"),
    ({"synflow_rounds": 0}, "pruner.synflow_rounds"),
])
def test_bad_options_fail_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        ReconvenePruner(**kwargs)
    assert "\n" not in str(err.value)


def test_cli_error_comes_before_training(compose_cfg, tmp_path, shared_data):
    cfg = compose_cfg(*FAST, "pruner=reconvene", "pruner.scores=[grasp]")
    with pytest.raises(ConfigError, match="pruner.scores"):
        run(cfg, tmp_path)
    assert not (tmp_path / "points.csv").exists()
