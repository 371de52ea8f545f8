"""SPLoRA linear (inferno.pruning.encoder.adapters): fused / low-rank / folded agree, removing a channel removes it
from the adapter too (and equals masking it), base weights never move, parameter counts, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inferno.pruning.encoder.adapters import (
    DEFAULT_INIT_RANGE,
    DEFAULT_RANK,
    SPLoRALinear,
    adapter_parameter_count,
    add_adapters,
    fold_adapters,
)

D = torch.float64


def _randomise(m: SPLoRALinear) -> SPLoRALinear:
    """Non-trivial adapters and bias (the default init makes B A ~ 1e-4)."""
    with torch.no_grad():
        m.adapter_a.normal_()
        m.adapter_b.normal_()
        m.bias.normal_()
    return m


def _splora(n_in: int, n_out: int, rank: int = 3, bias: bool = True) -> SPLoRALinear:
    return _randomise(SPLoRALinear.from_linear(nn.Linear(n_in, n_out, bias=bias, dtype=D), rank))


def test_from_linear_attributes_and_init():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=False, dtype=D)
    m = SPLoRALinear.from_linear(lin, 4)
    assert (m.in_features, m.out_features, m.rank) == (10, 6, 4)
    assert m.weight.shape == (6, 10) and not m.weight.requires_grad and torch.equal(m.weight, lin.weight)
    assert m.weight.data_ptr() != lin.weight.data_ptr()  # a copy: the linear is untouched
    assert m.bias.shape == (6,) and m.bias.requires_grad and torch.equal(m.bias, torch.zeros(6, dtype=D))
    assert m.adapter_a.shape == (4, 10) and m.adapter_b.shape == (6, 4)
    assert m.adapter_a.requires_grad and m.adapter_b.requires_grad
    assert all(p.dtype == D for p in m.parameters())
    # library defaults: A ~ nn.Linear init (|A| <= 1/sqrt(in)), B ~ U(-1e-4, 1e-4)
    assert (DEFAULT_RANK, DEFAULT_INIT_RANGE) == (16, 1e-4)
    assert m.adapter_a.abs().max() <= 10 ** -0.5 and m.adapter_a.abs().max() > 0.05
    assert 0 < m.adapter_b.abs().max() <= 1e-4
    x = torch.randn(5, 10, dtype=D)
    assert m.delta().abs().max() <= 4 * 1e-4 / 10 ** 0.5  # starts next to the base linear
    assert (m.eval()(x) - lin(x)).abs().max() <= 1e-3
    assert torch.equal(SPLoRALinear.from_linear(lin, 2, init_range=0).adapter_b, torch.zeros(6, 2, dtype=D))


def test_train_eval_fold_agree():
    torch.manual_seed(0)
    m = _splora(7, 5, rank=3)
    x = torch.randn(4, 2, 7, dtype=D)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    lin = m.fold()
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (5, 7)
    assert lin.weight.dtype == D and lin.weight.requires_grad and lin.bias.requires_grad
    y_fold = lin(x)
    base = x @ m.weight.T + m.bias
    assert (y_train - base).abs().max() > 1e-1  # the adapter is non-trivial
    assert (y_train - y_eval).abs().max() <= 1e-6
    assert (y_eval - y_fold).abs().max() <= 1e-6
    assert torch.allclose(lin.weight, m.weight + m.adapter_b @ m.adapter_a, atol=1e-12)


def _chain(seed: int = 0):
    torch.manual_seed(seed)
    return _splora(6, 8, rank=2), _splora(8, 4, rank=3)


def _run(lin1, lin2, x):
    return lin2(torch.tanh(lin1(x)))  # tanh(0) = 0: a silenced hidden unit contributes nothing


def test_masked_equals_removed_after_fold():
    idx = torch.tensor([1, 4, 5])
    keep = torch.tensor([0, 2, 3, 6, 7])
    x = torch.randn(9, 6, dtype=D)

    a1, a2 = _chain()  # variant A: mask (zero_) then fold
    a1.zero_(idx, "out")
    a2.zero_(idx, "in")
    ya = _run(a1.fold(), a2.fold(), x)

    b1, b2 = _chain()  # variant B: remove (shrink_) then fold
    b1.shrink_(keep_out=keep, keep_in=None)
    b2.shrink_(keep_out=None, keep_in=keep)
    assert (b1.out_features, b1.in_features, b2.out_features, b2.in_features) == (5, 6, 4, 5)
    assert b1.weight.shape == (5, 6) and b1.bias.shape == (5,)
    assert b1.adapter_b.shape == (5, 2) and b1.adapter_a.shape == (2, 6)  # adapter rows removed with the base rows
    assert b2.weight.shape == (4, 5) and b2.adapter_a.shape == (3, 5) and b2.adapter_b.shape == (4, 3)
    assert not b1.weight.requires_grad and b1.bias.requires_grad and b1.adapter_b.requires_grad
    assert not b2.weight.requires_grad and b2.adapter_a.requires_grad
    f1, f2 = b1.fold(), b2.fold()
    assert f1.weight.shape == (5, 6) and f2.weight.shape == (4, 5)
    yb = _run(f1, f2, x)

    ref1, ref2 = _chain()  # the kept rows / columns are the original ones
    assert torch.equal(b1.adapter_b, ref1.adapter_b[keep]) and torch.equal(b2.adapter_a, ref2.adapter_a[:, keep])
    assert torch.equal(b2.weight, ref2.weight[:, keep]) and torch.equal(b1.bias, ref1.bias[keep])

    assert (ya - yb).abs().max() <= 1e-6
    assert (_run(ref1.eval(), ref2.eval(), x) - ya).abs().max() > 1e-2  # pruning did change the function


def test_base_only_masking_leaves_channel_alive():
    """Zeroing only W's rows (a mask on the base weight) does not silence the channel: B[i] A x + b[i] remains."""
    idx = torch.tensor([1, 4, 5])
    x = torch.randn(9, 6, dtype=D)
    right1, _ = _chain()
    right1.zero_(idx, "out")
    base_only, _ = _chain()
    with torch.no_grad():
        base_only.weight[idx, :] = 0
        base_only.bias[idx] = 0
    h_right, h_base_only = right1.eval()(x), base_only.eval()(x)
    assert h_right[:, idx].abs().max() == 0
    assert h_base_only[:, idx].abs().min() > 0 and h_base_only[:, idx].abs().max() > 1e-1
    # and downstream: base-only masking differs from removal
    keep = torch.tensor([0, 2, 3, 6, 7])
    _, a2 = _chain()
    b1, b2 = _chain()
    a2.zero_(idx, "in")
    b1.shrink_(keep, None)
    b2.shrink_(None, keep)
    y_removed = _run(b1.fold(), b2.fold(), x)
    base_only_in = _chain()[1]
    with torch.no_grad():
        base_only_in.weight[:, idx] = 0
    y_base_only = _run(base_only.fold(), base_only_in.fold(), x)
    assert (y_base_only - y_removed).abs().max() > 1e-2
    assert (_run(right1.fold(), a2.fold(), x) - y_removed).abs().max() <= 1e-6


def test_base_weights_frozen_under_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_adapters(model, 2, init_range=0.1)
    mods = [m for m in model if isinstance(m, SPLoRALinear)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 3 * len(mods)  # adapter_a, adapter_b, bias of each
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    loss = model(torch.randn(16, 6)).pow(2).mean()
    loss.backward()
    opt.step()
    for i, m in enumerate(mods):
        assert m.weight.grad is None
        assert torch.equal(m.weight, before[f"{2 * i}.weight"])
        for name in ("adapter_a", "adapter_b", "bias"):
            assert not torch.equal(getattr(m, name), before[f"{2 * i}.{name}"]), name


def test_trainable_parameter_counts():
    torch.manual_seed(0)
    for n_in, n_out, r, bias in ((7, 5, 3, True), (4, 9, 1, False), (12, 12, 16, True)):
        m = SPLoRALinear.from_linear(nn.Linear(n_in, n_out, bias=bias), r)
        stored = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert stored == r * n_in + r * n_out + n_out == m.trainable_count()
    model = nn.Sequential(nn.Linear(10, 20), nn.GELU(), nn.Sequential(nn.Linear(20, 30, bias=False)),
                          nn.Linear(30, 4))
    names = add_adapters(model, 3)
    assert names == ["0", "2.0", "3"]
    expected = sum(3 * i + 3 * o + o for i, o in ((10, 20), (20, 30), (30, 4)))
    assert adapter_parameter_count(model) == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = model[0]
    m.shrink_(torch.arange(15), None)  # counts follow the pruned sizes
    assert m.trainable_count() == 3 * 10 + 3 * 15 + 15 == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_add_fold_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    add_adapters(model, 2)
    for m in model.modules():
        if isinstance(m, SPLoRALinear):
            _randomise(m)
    x = torch.randn(6, 5, dtype=D)
    y_adapted = model.eval()(x)
    y_train = model.train()(x)
    assert fold_adapters(model) == 2
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert adapter_parameter_count(model) == 0 and fold_adapters(model) == 0
    y_folded = model.eval()(x)
    assert (y_adapted - y_folded).abs().max() <= 1e-6 and (y_train - y_folded).abs().max() <= 1e-6


def test_shared_linear_and_multihead_attention():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert add_adapters(model, 1) == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], SPLoRALinear)
    assert adapter_parameter_count(model) == 4 + 4 + 4
    assert fold_adapters(model) == 1 and model[0] is model[2]
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert add_adapters(mha, 2) == []  # its forward reads out_proj.weight directly: left alone


@pytest.mark.parametrize("rank", [0, 1.5, -2, True, "4"])
def test_rank_validation(rank):
    with pytest.raises(ValueError, match=r"^pruner\.rank"):
        SPLoRALinear.from_linear(nn.Linear(3, 3), rank)
    with pytest.raises(ValueError, match=r"^pruner\.rank"):
        add_adapters(nn.Sequential(nn.Linear(3, 3)), rank)


@pytest.mark.parametrize("init_range", [-1e-3, float("nan"), float("inf")])
def test_init_range_validation(init_range):
    with pytest.raises(ValueError, match=r"^pruner\.init_range"):
        add_adapters(nn.Sequential(nn.Linear(3, 3)), 2, init_range=init_range)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_index_validation():
    m = SPLoRALinear.from_linear(nn.Linear(4, 5), 2)
    with pytest.raises(ValueError, match="outside"):
        m.shrink_(torch.tensor([0, 5]), None)
    with pytest.raises(ValueError, match="duplicated"):
        m.zero_(torch.tensor([1, 1]), "out")
    with pytest.raises(ValueError, match="dim"):
        m.zero_(torch.tensor([1]), "rows")
    assert m.weight.shape == (5, 4)  # nothing touched
    m.shrink_(torch.tensor([], dtype=torch.long), None)  # every output removed: a zero-size layer
    assert m.weight.shape == (0, 4) and m.adapter_b.shape == (0, 2) and m.fold()(torch.randn(2, 4)).shape == (2, 0)


def test_surgery_on_adapted_bert_mask_equals_remove():
    """Through the project's surgery on a tiny BERT: heads / neurons leave base AND adapter; mask == remove."""
    import copy

    from inferno.models.encoder import EncoderClassifier
    from inferno.pruning.llm import surgery

    torch.manual_seed(0)
    m = EncoderClassifier(num_classes=3, pretrained=False, dropout=0.0, config_overrides={
        "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48}).eval()
    names = add_adapters(m.bert.encoder, 2)
    assert len(names) == 2 * 6
    for mod in m.modules():
        if isinstance(mod, SPLoRALinear):
            with torch.no_grad():
                mod.adapter_b.normal_(std=0.05)
    d = {0: surgery.BlockDecision(heads=[1, 3], neurons=list(range(0, 48, 3))),
         1: surgery.BlockDecision(heads=[0], neurons=list(range(20)))}
    masked, removed = copy.deepcopy(m), copy.deepcopy(m)
    surgery.apply(masked, d, "mask")
    surgery.apply(removed, d, "remove")
    blk = removed.bert.encoder.layer[0]
    assert blk.attention.self.query.adapter_b.shape == (16, 2) and blk.attention.output.dense.adapter_a.shape == (2, 16)
    assert blk.intermediate.dense.adapter_b.shape == (32, 2) and blk.output.dense.adapter_a.shape == (2, 32)
    x = torch.randint(1000, 5000, (4, 3, 10))
    x[:, 1], x[:, 2] = 1, 0
    y_masked, y_removed = masked(x), removed(x)
    assert fold_adapters(masked) == fold_adapters(removed) == 12
    assert (y_masked - y_removed).abs().max() < 1e-5
    assert (masked(x) - removed(x)).abs().max() < 1e-5
    assert (masked(x) - m(x)).abs().max() > 1e-4
