"""pruner=dnnshifter: IMP level counts and rewinding, BatchNorm folding, sparse -> smaller (exact and naive), the
parameter count of the plan, the portfolio's switch and safetensors reload, the CLI run and its errors."""

import copy
import math

import pytest
import torch
from torch import nn

from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.dnnshifter import (
    DNNShifter,
    Portfolio,
    level_keep,
    load_variant,
    magnitude_masks,
    save_variant,
    shrink,
)
from inferno.pruning.cnn.masks import apply_masks, prunable_layers
from inferno.pruning.cnn.surgery import channel_groups, fold_batchnorm
from inferno.run import RunContext, run
from inferno.tracking import read_points

torch.set_default_dtype(torch.float32)


def randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 1.6 + 0.2
            m.bias.data = torch.rand(n, generator=g) - 0.5
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return net.eval()


def kill_filters(net: nn.Module, fraction: float, seed: int = 0, negative: float = 0.5) -> int:
    """Zero a random ``fraction`` of every non-head conv's output filters; about ``negative`` of their BatchNorms
    get a strongly negative bias (a constant 0 after ReLU), the rest keep a non-zero one. Returns filters zeroed."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    killed = 0
    with torch.no_grad():
        for name in names:
            conv = modules[name]
            n = conv.out_channels
            idx = torch.randperm(n, generator=g)[: max(1, int(n * fraction))]
            conv.weight[idx] = 0
            killed += len(idx)
            bn = modules.get(name.replace("conv", "bn")) if "conv" in name else None
            if isinstance(bn, nn.BatchNorm2d) and bn.num_features == n:
                neg = idx[torch.rand(len(idx), generator=g) < negative]
                bn.bias[neg] = -5.0 - bn.running_mean[neg].abs()  # well below zero whatever the mean
    return killed


class HandNet(nn.Module):
    """conv1 (3x3, padded) -> BN -> ReLU -> conv2 (3x3, unpadded) -> BN -> ReLU -> pool -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


X8 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------- IMP
def test_level_counts_follow_the_reference_and_the_geometric_rule():
    total = 59906
    remaining = total
    for _ in range(25):
        remaining -= math.ceil(0.2 * remaining)  # OpenLTH's sparse_global: prune ceil(fraction * remaining)
    assert level_keep(total, 0.2, 1, "reference") == total - math.ceil(0.2 * total)
    kept = total
    for k in range(1, 26):
        kept = level_keep(total, 0.2, k, "reference", kept)
    assert kept == remaining
    for k in range(26):
        assert abs(level_keep(total, 0.2, k, "geometric") - total * 0.8**k) <= 1  # density 0.8^k within one weight
    # the reference rule drifts from 0.8^k by at most one weight per level
    kept = total
    for k in range(1, 26):
        kept = level_keep(total, 0.2, k, "reference", kept)
        assert 0 <= total * 0.8**k - kept <= k


def test_magnitude_masks_keep_the_global_largest_surviving_weights():
    torch.manual_seed(0)
    net = HandNet()
    names = list(prunable_layers(net, include_head=False))
    modules = dict(net.named_modules())
    total = sum(modules[n].weight.numel() for n in names)
    masks = {n: torch.ones_like(modules[n].weight, dtype=torch.bool) for n in names}
    for k in range(1, 6):
        keep = level_keep(total, 0.2, k, "geometric")
        with torch.no_grad():  # "training" between levels changes the surviving weights
            for n in names:
                modules[n].weight.mul_(1 + 0.3 * torch.randn_like(modules[n].weight))
        new = magnitude_masks(net, names, keep, masks)
        # independently: the keep-th largest |w| among the survivors is the threshold
        alive = torch.cat([modules[n].weight.detach().abs()[masks[n]] for n in names])
        threshold = alive.sort(descending=True).values[keep - 1]
        for n in names:
            expect = masks[n] & (modules[n].weight.detach().abs() >= threshold)
            assert torch.equal(new[n], expect)
            assert not (new[n] & ~masks[n]).any()  # nested: a pruned weight never comes back
        assert sum(int(m.sum()) for m in new.values()) == keep
        assert abs(keep / total - 0.8**k) <= 1 / total
        masks = new


FAST = ["task=digits", "model.stages=2", "model.depth=1", "model.width=1", "model.base_channels=16",
        "train.dense_epochs=1", "hardware.limit_batches=3", "hardware.latency_repeats=1",
        "hardware.latency_batch_size=8", "hardware.progress_bar=false", "logger=none"]


def test_cli_run_rewinds_and_records_every_level(compose_cfg, tmp_path, monkeypatch, shared_data):
    """Every level starts from the step-2 weights of the dense training on its surviving positions (zero
    elsewhere); points: dense + sparse / smaller / naive per level, densities by the reference rule."""
    seen, early = [], {}
    dense_fn, finetune_fn = RunContext.dense, RunContext.finetune

    class Early:  # an independent record of the weights after 2 optimizer steps
        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == 2 and not early:
                early.update({k: v.detach().clone() for k, v in module.net.state_dict().items()})

    import lightning as L

    class EarlyCallback(Early, L.Callback):
        pass

    def dense(self, callbacks=None):
        return dense_fn(self, callbacks=[*(callbacks or []), EarlyCallback()])

    def finetune(self, net, epochs, cost, train=None, val_history=None, callbacks=None, **kw):
        if any(hasattr(m, "weight_mask") for m in net.modules()):
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            effective = {n: (m.weight_orig * m.weight_mask).detach().clone()
                         for n, m in net.named_modules() if hasattr(m, "weight_mask")}
            seen.append((state, effective))
        return finetune_fn(self, net, epochs, cost, train, val_history, callbacks, **kw)

    monkeypatch.setattr(RunContext, "dense", dense)
    monkeypatch.setattr(RunContext, "finetune", finetune)
    cfg = compose_cfg(*FAST, "pruner=dnnshifter", "pruner.levels=3", "pruner.rewind_iter=2", "pruner.switch_repeats=2")
    run(cfg, tmp_path)

    assert early and len(seen) == 3
    for state, effective in seen:
        for key, value in early.items():
            if key.endswith(".weight") and key[: -len(".weight")] in effective:
                name = key[: -len(".weight")]
                mask = state[name + ".weight_mask"].bool()
                assert torch.equal(state[name + ".weight_orig"][mask], value[mask])  # rewound exactly
                assert torch.equal(effective[name], value * mask)
            else:
                assert torch.equal(state[key], value), key  # BatchNorm statistics and biases rewound too

    rows = read_points(tmp_path / "points.csv")
    assert [r["method"] for r in rows] == ["dense"] + ["dnnshifter"] * 9
    assert [(int(r["level"]), r["variant"]) for r in rows[1:]] == [
        (k, v) for k in (1, 2, 3) for v in ("sparse", "smaller", "naive")]
    net = MicroCNN(2, 1, 1, 16, in_channels=1)
    total = sum(m.weight.numel() for m in prunable_layers(net, include_head=False).values())
    kept = total
    for k, r in zip((1, 2, 3), rows[1::3]):
        kept -= math.ceil(0.2 * kept)
        assert float(r["sparsity"]) == pytest.approx(1 - kept / total, abs=1e-6)
        assert float(r["target_density"]) == pytest.approx(0.8**k)
    for sparse, smaller in zip(rows[1::3], rows[2::3]):
        assert float(smaller["max_abs_diff"]) < 1e-4
        assert float(smaller["value"]) == pytest.approx(float(sparse["value"]), abs=1e-9)
        assert int(smaller["params"]) <= int(sparse["params"])
        assert float(smaller["compression"]) == pytest.approx(int(sparse["params"]) / int(smaller["params"]), rel=1e-3)
        assert float(smaller["switch_ms"]) < float(smaller["reload_ms"])
    assert sorted(p.name for p in (tmp_path / "portfolio").iterdir()) == sorted(
        f"level_{k:02d}.{ext}" for k in (1, 2, 3) for ext in ("json", "safetensors"))


# ----------------------------------------------------------------------------------- BN fold, sparse -> smaller
@pytest.mark.parametrize("family", ["microcnn", "resnet20", "hand"])
def test_batchnorm_fold_keeps_the_logits(family):
    net = {"microcnn": lambda: MicroCNN(2, 2, 1, 16, in_channels=1), "resnet20": lambda: ResNet20(2, 8, in_channels=1),
           "hand": HandNet}[family]()
    randomise_bn(net)
    folded = copy.deepcopy(net)
    pairs = fold_batchnorm(folded)
    bns = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(b for _, b in pairs) == sorted(bns)  # every BatchNorm follows a conv in these families
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(X8), net(X8), atol=1e-5, rtol=0)


def test_hand_net_shrinks_to_the_hand_plan():
    torch.manual_seed(0)
    net = randomise_bn(HandNet())
    with torch.no_grad():
        net.conv1.weight[[1, 3, 5]] = 0
        net.bn1.bias[1] = -9.0  # constant 0 after ReLU: nothing to fold
        net.bn1.bias[[3, 5]] = torch.tensor([0.7, 1.1])
        net.bn1.running_mean[[1, 3, 5]] = 0.0
        net.conv2.weight[[0, 2]] = 0
        net.bn2.bias[[0, 2]] = torch.tensor([0.9, 0.4])
        net.bn2.running_mean[[0, 2]] = 0.0
    example = X8[:1]
    smaller, plan = shrink(net, example, X8, "fold")
    assert plan.remove == {"conv1": [1, 3, 5], "conv2": [0, 2]} and plan.dead == 5 and plan.kept == 0
    # folded: conv1's channels 3 and 5 into conv2 (unpadded), conv2's 0 and 2 into the head (through the pool)
    assert sorted((n, c) for n, c, _ in plan.folds) == [("conv1", 3), ("conv1", 5), ("head", 0), ("head", 2)] or \
        sorted((n, c) for n, c, _ in plan.folds) == [("conv2", 3), ("conv2", 5), ("head", 0), ("head", 2)]
    by_hand = (5 * 1 * 9 + 5) + (4 * 5 * 9 + 4) + (4 * 4 + 4)  # conv1 (+ folded bias), conv2 (+ bias), head
    assert sum(p.numel() for p in smaller.parameters()) == by_hand
    with torch.no_grad():
        torch.testing.assert_close(smaller(X8), net(X8), atol=1e-5, rtol=0)
        naive, nplan = shrink(net, example, X8, "drop")
        assert nplan.remove == plan.remove and not nplan.folds
        assert sum(p.numel() for p in naive.parameters()) == by_hand
        assert (naive(X8) - net(X8)).abs().max() > 1e-2  # the dropped constants change the function


def planned_params(folded: nn.Module, example: torch.Tensor, remove: dict[str, list[int]]) -> int:
    """Parameters left after removing ``remove`` from the BatchNorm-folded net, counted from each layer's final
    shape: (out - removed outputs) x (in - removed inputs) x kernel, plus the shrunk bias."""
    _, groups = channel_groups(folded, example)
    cut_out, cut_in = {}, {}
    for g in groups:
        r = len(remove.get(g.root, []))
        for name, _, _ in g.producers:
            cut_out[name] = cut_out.get(name, 0) + r
        for name, _, _ in g.consumers:
            cut_in[name] = cut_in.get(name, 0) + r
    count = 0
    for name, m in folded.named_modules():
        own = [p for p in m.parameters(recurse=False)]
        if not own:
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            out, inp = m.weight.shape[:2]
            kernel = m.weight[0, 0].numel()
            out, inp = out - cut_out.get(name, 0), inp - cut_in.get(name, 0)
            count += out * inp * kernel + (out if m.bias is not None else 0)
        else:  # norms etc. follow their channel count
            count += sum(p.numel() for p in own) - cut_out.get(name, 0) * len(own)
    return count


@pytest.mark.parametrize("family,seed", [("microcnn", 0), ("microcnn", 1), ("resnet20", 0), ("resnet20", 1)])
def test_smaller_model_equals_the_sparse_model(family, seed):
    torch.manual_seed(seed)
    net = MicroCNN(2, 2, 1, 16, in_channels=1) if family == "microcnn" else ResNet20(2, 8, in_channels=1)
    randomise_bn(net, seed)
    killed = kill_filters(net, 0.4, seed)
    example = X8[:1]
    smaller, plan = shrink(net, example, X8, "fold")
    assert 0 < plan.removed <= plan.dead <= killed  # a channel is dead only where all its producers are zero
    folded = copy.deepcopy(net)
    fold_batchnorm(folded)
    folded_params = sum(p.numel() for p in folded.parameters())
    plan_biases = len({n for n, _, _ in plan.folds if dict(folded.named_modules())[n].bias is None})
    expect = planned_params(folded, example, plan.remove)
    # a fold may give a bias-free layer a bias: each such layer adds its (shrunk) output count
    extra = sum(m.bias.numel() for n, m in smaller.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None
                and dict(folded.named_modules())[n].bias is None)
    assert (plan_biases == 0) == (extra == 0)
    assert sum(p.numel() for p in smaller.parameters()) == expect + extra < folded_params
    with torch.no_grad():
        torch.testing.assert_close(smaller(X8), net(X8), atol=1e-5, rtol=0)
        other = torch.randn(4, 1, 8, 8)  # not the probe the constants were read on
        torch.testing.assert_close(smaller(other), net(other), atol=1e-5, rtol=0)


def test_masked_network_shrinks_like_its_permanent_copy():
    torch.manual_seed(0)
    net = randomise_bn(MicroCNN(2, 1, 1, 16, in_channels=1))
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_layers(net, False).items()}
    masks["stages.0.0.conv2"][:2] = False  # two whole filters
    apply_masks(net, masks)
    smaller, plan = shrink(net, X8[:1], X8)
    assert plan.dead >= 2 and any(hasattr(m, "weight_mask") for m in net.modules())  # the sparse model is untouched
    with torch.no_grad():
        torch.testing.assert_close(smaller(X8), net(X8), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- portfolio
def test_portfolio_switch_and_reload_give_the_stored_variants(tmp_path):
    portfolio = Portfolio()
    stored = {}
    for level, (family, seed) in enumerate([("microcnn", 0), ("resnet20", 1), ("microcnn", 2)], start=1):
        torch.manual_seed(seed)
        net = MicroCNN(2, 2, 1, 16, in_channels=1) if family == "microcnn" else ResNet20(2, 8, in_channels=1)
        randomise_bn(net, seed)
        kill_filters(net, 0.4, seed)
        smaller, _ = shrink(net, X8[:1], X8)
        portfolio.add(level, smaller)
        with torch.no_grad():
            stored[level] = smaller(X8).clone()
    portfolio.save(tmp_path)
    assert portfolio.levels == [1, 2, 3] and portfolio.active is None
    for level in (2, 1, 3, 2):
        model = portfolio.switch(level)
        assert portfolio.active is model and portfolio.active_level == level
        with torch.no_grad():
            assert torch.equal(model(X8), stored[level])
            loaded = load_variant(tmp_path / f"level_{level:02d}")
            torch.testing.assert_close(loaded(X8), stored[level], atol=1e-6, rtol=0)
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    mb = sum(t.numel() * t.element_size() for v in portfolio.variants.values()
             for t in [*v.parameters(), *v.buffers()]) / 2**20
    assert portfolio.memory_mb() == pytest.approx(mb, rel=1e-6)
    with pytest.raises(KeyError, match="levels: \\[1, 2, 3\\]"):
        portfolio.switch(7)
    with pytest.raises(ConfigError, match="not found"):
        load_variant(tmp_path / "level_09")
    (tmp_path / "level_01.json").write_text('{"family": "os.system", "spec": {}, "config": {}}')
    with pytest.raises(ConfigError, match="allowed: MicroCNN, ResNet20"):
        load_variant(tmp_path / "level_01")
    save_variant(portfolio.variants[3], tmp_path / "again" / "v")
    assert (tmp_path / "again" / "v.safetensors").is_file()


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    ({"levels": 0}, "pruner.levels"),
    ({"rate": 1.0}, r"pruner.rate: 1.0 must be a fraction in \(0, 1\)"),
    ({"rate": 0}, "pruner.rate"),
    ({"rate": "a"}, "pruner.rate"),
    ({"count_rule": "cubic"}, "pruner.count_rule"),
    ({"constants": "keep"}, "pruner.constants"),
    ({"rewind_iter": -1}, "pruner.rewind_iter"),
    ({"probe_batch": 0}, "pruner.probe_batch"),
])
def test_bad_options_fail_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        DNNShifter(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,match", [
    ("pruner.rewind_iter=100000", "pruner.rewind_iter: 100000 must be below"),
    ("model.checkpoint={ckpt}", "model.checkpoint: DNNShifter rewinds"),  # a readable file, still refused
    ("model.checkpoint=/nonexistent.safetensors", "model.checkpoint: file /nonexistent.safetensors not found"),
    ("pruner.levels=0", "pruner.levels"),
])
def test_cli_errors_come_before_training(compose_cfg, tmp_path, override, match, shared_data):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "ckpt.safetensors"))
    cfg = compose_cfg(*FAST, "pruner=dnnshifter", override.format(ckpt=tmp_path / "ckpt.safetensors"))
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path)
    assert not (tmp_path / "dense.safetensors").exists()
