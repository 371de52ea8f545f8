"""Structured LLM methods (inferno.pruning.llm.structured): every score and decision recomputed in the test from the
paper's rule with explicit loops over heads / neurons (the q-to-KV mapping written out: query head h belongs to KV
head h // g), masked = removed logits for every method, and the identity cases (a group with zero o_proj columns, a
channel with constant input, an identity block) that a correct method must remove first and without effect."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from inferno.errors import ConfigError
from inferno.models.hf import tiny_causal_lm, tiny_config
from inferno.pruning.llm import surgery
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import get_blocks, prune_model
from inferno.pruning.llm.structured import (
    STRUCTURED,
    ChannelMoments,
    Flap,
    Nirvana,
    attn_mlp_params,
    block_unit_scores,
    first_order_saliency,
    fluctuation,
    kl_divergence,
    nirvana_objective,
)

torch.set_num_threads(1)


def llama(heads=8, kv=2, layers=2, hidden=64, inter=128, seed=0, family="llama"):
    cfg = tiny_config(family, hidden=hidden, heads=heads, layers=layers, intermediate=inter)
    cfg.num_key_value_heads = kv
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids(n=4, t=16, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def parts(block):
    a, m = block.self_attn, block.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def brute_unit_scores(block, S, heads, kv):
    """KV group j: its q rows (query heads j*g .. j*g+g-1), k and v rows, o columns; neuron n: gate/up rows, down
    column -- each summed entry by entry from the per-weight saliency S."""
    q, k, v, o, gate, up, down = (S[m] for m in parts(block))
    g, d = heads // kv, q.shape[1] // heads
    groups = []
    for j in range(kv):
        total = 0.0
        for h in range(heads):
            if h // g == j:  # HF repeat_kv
                total += float(q[h * d:(h + 1) * d].double().sum()) + float(o[:, h * d:(h + 1) * d].double().sum())
        total += float(k[j * d:(j + 1) * d].double().sum()) + float(v[j * d:(j + 1) * d].double().sum())
        groups.append(total)
    neurons = [float(gate[n].double().sum() + up[n].double().sum() + down[:, n].double().sum()) for n in range(gate.shape[0])]
    return torch.tensor(groups, dtype=torch.float64), torch.tensor(neurons, dtype=torch.float64)


def manual_saliency(model, x, f):
    m = copy.deepcopy(model)
    out = f(m(input_ids=x).logits)
    out.backward()
    return m, {mod: (mod.weight.grad * mod.weight.detach()).abs() for b in get_blocks(m) for mod in parts(b)}


# ----------------------------------------------------------------------------------- NIRVANA
def test_nirvana_scores_equal_brute_force_sums_gqa():
    model, x = llama(heads=8, kv=2), ids()
    # F = mean over batch and vocabulary of each logit's max over the sequence (the public code's logits.max(dim=1))
    twin, S = manual_saliency(model, x, lambda lg: lg.max(dim=1).values.mean())
    ours = first_order_saliency(model, x, nirvana_objective("seq"), batch_size=4)
    for block, tblock in zip(get_blocks(model), get_blocks(twin)):
        hs, ns = block_unit_scores(block, model.config, ours)
        bh, bn = brute_unit_scores(tblock, S, 8, 2)
        torch.testing.assert_close(hs, bh, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ns, bn, rtol=1e-6, atol=1e-6)
    # chunks of the batch give the gradient of the whole batch's mean
    chunked = first_order_saliency(model, x, nirvana_objective("seq"), batch_size=1)
    for m in ours:
        torch.testing.assert_close(chunked[m], ours[m], rtol=1e-4, atol=1e-7)
    # the vocabulary ablation differentiates another objective
    twin_v, S_v = manual_saliency(model, x, lambda lg: lg.max(dim=-1).values.mean())
    vocab = first_order_saliency(model, x, nirvana_objective("vocab"), batch_size=4)
    hs, _ = block_unit_scores(get_blocks(model)[0], model.config, vocab)
    torch.testing.assert_close(hs, brute_unit_scores(get_blocks(twin_v)[0], S_v, 8, 2)[0], rtol=1e-6, atol=1e-6)


def test_gamma_rule_counts_and_parameters():
    model = llama(heads=4, kv=4, layers=4, hidden=256, inter=688)
    m = Nirvana(sparsity=0.5, gamma=3.0, round_to=1)
    plan = m.plan(model)
    assert (plan["groups"], plan["total_groups"]) == (3, 16)
    assert (plan["neurons"], plan["total_neurons"]) == (1766, 2752)
    assert plan["neuron_fraction"] / plan["group_fraction"] == pytest.approx(3.0, rel=1e-12)
    # parameters: a KV group = q, k, v rows + o columns (4 x 64 x 256), a neuron = gate, up rows + down column (3 x 256)
    per_group, per_neuron, total = 4 * 64 * 256, 3 * 256, 16 * 4 * 64 * 256 + 2752 * 3 * 256
    assert attn_mlp_params(model) == total
    exact = plan["group_fraction"] * 16 * per_group + plan["neuron_fraction"] * 2752 * per_neuron
    assert exact / total == pytest.approx(0.5, rel=1e-12)  # before flooring: exactly s
    removed = 3 * per_group + 1766 * per_neuron
    assert abs(removed / total - 0.5) < 0.01
    # the decisions remove exactly those counts (round_to=1), the lowest scores globally
    torch.manual_seed(3)
    sal = {mod: torch.rand_like(mod.weight) for b in get_blocks(model) for mod in parts(b)}
    m.decide(model, sal)
    assert sum(len(d.heads) for d in m.decisions.values()) == 3
    assert sum(len(d.neurons) for d in m.decisions.values()) == 1766
    scores = [block_unit_scores(b, model.config, sal)[1] for b in get_blocks(model)]
    flat = torch.cat(scores)
    cut = torch.sort(flat).values[1765]
    for i, s in enumerate(scores):
        assert sorted(m.decisions[i].neurons) == sorted(torch.nonzero(s <= cut).flatten().tolist())
    # round_to=8: every layer keeps a multiple of 8 neurons (or all), dropping fewer, never more
    m8 = Nirvana(sparsity=0.5, gamma=3.0, round_to=8)
    m8.decide(model, sal)
    for i, d in m8.decisions.items():
        kept = 688 - len(d.neurons)
        assert kept % 8 == 0 and kept >= 688 - len(m.decisions[i].neurons)
        assert set(d.neurons) <= set(m.decisions[i].neurons)


def test_zero_o_columns_group_scores_zero_is_pruned_first_and_changes_nothing():
    model, x = llama(heads=8, kv=2), ids()
    g, d = 4, 8
    with torch.no_grad():
        get_blocks(model)[0].self_attn.o_proj.weight[:, 1 * g * d:2 * g * d] = 0  # KV group 1 of layer 0
    sal = first_order_saliency(model, x, nirvana_objective("seq"))
    hs, _ = block_unit_scores(get_blocks(model)[0], model.config, sal)
    assert hs[1] == 0 and hs[0] > 0
    m = Nirvana(sparsity=0.3, gamma=1.0, round_to=1)  # a = s with gamma 1: floor(0.3 x 4) = 1 group
    m.decide(model, sal)
    assert {i: dd.heads for i, dd in m.decisions.items() if dd.heads} == {0: [1]}
    removed = copy.deepcopy(model)
    surgery.apply(removed, {0: surgery.BlockDecision(heads=[1])})
    assert (logits(removed, x) - logits(model, x)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------- every method
def build_method(name, sparsity, apply, **kw):
    return get_method(name, sparsity=sparsity, apply=apply, **kw)


@pytest.mark.parametrize("name", sorted(STRUCTURED))
@pytest.mark.parametrize("family", ["gqa", "opt", "gpt2", "qwen2"])
def test_masked_equals_removed(name, family):
    dense = llama(heads=8, kv=2, layers=4) if family == "gqa" else tiny_causal_lm(family, seed=0, layers=4)
    sparsity = {"shortgpt": 0.25, "nirvana": 0.4}.get(name, 0.5)
    kw = {"gamma": 1.0} if name == "nirvana" else {}
    masked, removed = copy.deepcopy(dense), copy.deepcopy(dense)
    mm, mr = build_method(name, sparsity, "mask", **kw), build_method(name, sparsity, "remove", **kw)
    calib = ids(8, 32, seed=1)
    prune_model(masked, mm, calib, progress=False)
    prune_model(removed, mr, calib, progress=False)
    assert mm.summary() == mr.summary()
    x = ids(2, 24, seed=5)
    lm, lr, ld = logits(masked, x), logits(removed, x), logits(dense, x)
    assert (lm - lr).abs().max() < 1e-5
    assert (lm - ld).abs().max() > 1e-4
    n = lambda net: sum(p.numel() for p in net.parameters())
    assert n(removed) < n(dense)
    achieved = 1 - attn_mlp_params(removed) / attn_mlp_params(dense)
    if name in ("wanda_sp", "llm_pruner"):  # int(n x ratio) of every layer's groups and neurons
        assert achieved == pytest.approx(sparsity, abs=0.02)
    if name == "shortgpt":
        assert len(get_blocks(removed)) == 3 and achieved == pytest.approx(0.25)


# ----------------------------------------------------------------------------------- Wanda-sp / LLM-Pruner rules
def inputs_of(model, x, module):
    seen = []
    h = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    logits(model, x)
    h.remove()
    return torch.cat(seen)


def test_wanda_sp_first_layer_equals_rule():
    model, x = llama(heads=8, kv=2), ids(8, 32)
    block = get_blocks(model)[0]
    o, down = block.self_attn.o_proj, block.mlp.down_proj
    xo, xd = inputs_of(model, x, o), inputs_of(model, x, down)
    col_o = o.weight.detach().abs().mean(0) * xo.double().pow(2).sum(0).sqrt().float()
    heads = torch.tensor([float(col_o[j * 32:(j + 1) * 32].sum()) for j in range(2)])
    neurons = down.weight.detach().abs().mean(0) * xd.double().pow(2).sum(0).sqrt().float()
    m = get_method("wanda_sp", sparsity=0.5)
    prune_model(copy.deepcopy(model), m, x, progress=False)
    assert m.decisions[0].heads == [int(torch.argmin(heads))]
    assert m.decisions[0].neurons == sorted(torch.argsort(neurons)[:64].tolist())


def test_llm_pruner_equals_grouped_taylor_rule_with_skipped_layer():
    model, x = llama(heads=8, kv=2, layers=3), ids(4, 32)
    twin = copy.deepcopy(model)
    lg = twin(input_ids=x).logits
    F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)).backward()
    S = {mod: (mod.weight.grad * mod.weight.detach()).abs() for b in get_blocks(twin) for mod in parts(b)}
    m = get_method("llm_pruner", sparsity=0.3, skip_layers=[0], ratio_rule="total")
    prune_model(copy.deepcopy(model), m, x, progress=False, batch_size=2)
    assert m.ratio == pytest.approx(0.3 * 3 / 2)  # equal layers: two pruned layers carry the whole model's 30 %
    assert 0 not in m.decisions
    for i in (1, 2):
        bh, bn = brute_unit_scores(get_blocks(twin)[i], S, 8, 2)
        # the public code's count: n - int(n (1 - r))
        assert m.decisions[i].heads == sorted(torch.argsort(bh)[: 2 - int(2 * (1 - 0.45))].tolist())
        assert m.decisions[i].neurons == sorted(torch.argsort(bn)[: 128 - int(128 * (1 - 0.45))].tolist())
    ref = get_method("llm_pruner", sparsity=0.4, skip_layers=[0])  # per_layer: 40 % of every pruned layer
    prune_model(copy.deepcopy(model), ref, x, progress=False, batch_size=2)
    assert ref.ratio == 0.4 and 0 not in ref.decisions
    assert len(ref.decisions[1].neurons) == 128 - int(128 * 0.6)


# ----------------------------------------------------------------------------------- FLAP
def test_flap_threshold_equals_rule():
    model, x = llama(heads=8, kv=2, layers=2), ids(8, 32)
    heads, neurons = [], []
    for block in get_blocks(model):  # every statistic from the dense model
        o, down = block.self_attn.o_proj, block.mlp.down_proj
        xo, xd = inputs_of(model, x, o).double(), inputs_of(model, x, down).double()
        mo = (xo.var(0) * o.weight.detach().double().pow(2).sum(0)).pow(2)  # the public code squares the attention metric
        md = xd.var(0) * down.weight.detach().double().pow(2).sum(0)
        mo, md = (mo - mo.mean()) / mo.std(), (md - md.mean()) / md.std()
        heads.append(torch.stack([mo[j * 32:(j + 1) * 32].mean() for j in range(2)]))
        neurons.append(md)
    per_group, per_neuron = 2 * 32 * 64 + 2 * 8 * 64, 3 * 64
    units = [(float(h[j]), per_group, i, "h", j) for i, h in enumerate(heads) for j in range(2)]
    units += [(float(n[j]), per_neuron, i, "n", j) for i, n in enumerate(neurons) for j in range(128)]
    units.sort(key=lambda u: -u[0])
    total = sum(u[1] for u in units)
    run, best, keep = 0, math.inf, 0
    for k, u in enumerate(units):
        run += u[1]
        if abs(run - 0.5 * total) < best:
            best, keep = abs(run - 0.5 * total), k
    m = get_method("flap", sparsity=0.5)
    prune_model(copy.deepcopy(model), m, x, progress=False)
    for i in range(2):
        expect_h = sorted(u[4] for u in units[keep:] if u[2] == i and u[3] == "h")
        expect_n = sorted(u[4] for u in units[keep:] if u[2] == i and u[3] == "n")
        if len(expect_h) == 2:
            expect_h.remove(int(torch.argmax(heads[i])))
        got = m.decisions.get(i, surgery.BlockDecision())
        assert (got.heads, got.neurons) == (expect_h, expect_n)


def test_flap_constant_channel_scores_zero_and_compensated_removal_is_exact():
    """Qwen2 (v_proj has a bias): zero v rows + constant bias make KV group 0's attention output constant."""
    model, x = llama(heads=4, kv=2, layers=2, family="qwen2"), ids(8, 32)
    attn = get_blocks(model)[0].self_attn
    d = 16
    with torch.no_grad():
        attn.v_proj.weight[:d] = 0
        attn.v_proj.bias[:d] = torch.linspace(-1, 1, d)
    stats = ChannelMoments(64)
    stats.add(inputs_of(model, x, attn.o_proj))
    metric = fluctuation(stats.var, attn.o_proj.weight)
    assert metric[: 2 * d].abs().max() < 1e-10 and metric[2 * d:].min() > 1e-6  # query heads 0, 1 share KV head 0
    assert attn.o_proj.bias is None
    flap = Flap(sparsity=0.3)
    flap.threshold = lambda heads, neurons, params: flap.decisions.update({0: surgery.BlockDecision(heads=[0])})
    pruned = copy.deepcopy(model)
    flap_model = pruned
    prune_model(flap_model, flap, ids(8, 32, seed=2), progress=False)
    assert get_blocks(pruned)[0].self_attn.o_proj.bias is not None  # compensation added a bias
    assert get_blocks(pruned)[0].self_attn.o_proj.in_features == 32
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5
    # the ablation without compensation loses the group's constant contribution
    bare = Flap(sparsity=0.3, compensate=False)
    bare.threshold = lambda heads, neurons, params: bare.decisions.update({0: surgery.BlockDecision(heads=[0])})
    uncompensated = copy.deepcopy(model)
    prune_model(uncompensated, bare, ids(8, 32, seed=2), progress=False)
    assert get_blocks(uncompensated)[0].self_attn.o_proj.bias is None
    assert (logits(uncompensated, x) - logits(model, x)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------- ShortGPT
def test_shortgpt_identity_block_has_zero_influence_and_goes_first():
    model, x = tiny_causal_lm("llama", seed=0, layers=4), ids(4, 32)
    with torch.no_grad():
        get_blocks(model)[2].self_attn.o_proj.weight.zero_()
        get_blocks(model)[2].mlp.down_proj.weight.zero_()
    m = get_method("shortgpt", sparsity=0.25)
    pruned = copy.deepcopy(model)
    prune_model(pruned, m, x, progress=False)
    assert m.bi[2] == pytest.approx(0.0, abs=1e-6) and min(v for i, v in m.bi.items() if i != 2) > 1e-3
    assert m.drop == [2] and len(get_blocks(pruned)) == 3
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5
    # the BI of block 0 recomputed from the hidden states HF returns (embeddings -> block 0's output)
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
    bi0 = (1 - F.cosine_similarity(hs[0].reshape(-1, 64), hs[1].reshape(-1, 64), dim=-1)).mean()
    assert m.bi[0] == pytest.approx(float(bi0), rel=1e-5)


# ----------------------------------------------------------------------------------- KL
def test_kl_equals_definition():
    dense, other, x = llama(seed=0), llama(seed=1), ids(3, 20)
    p, q = logits(dense, x).double().softmax(-1), logits(other, x).double().softmax(-1)
    expect = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl_divergence(dense, other, x, batch_size=2) == pytest.approx(float(expect), rel=1e-5)
    assert kl_divergence(dense, dense, x) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, key", [({"gamma": 0}, "pruner.gamma"), ({"gamma": -1.0}, "pruner.gamma"),
                                     ({"round_to": 0}, "pruner.round_to"), ({"saliency_reduce": "mean"}, "pruner.saliency_reduce")])
def test_nirvana_bad_options(kw, key):
    with pytest.raises(ConfigError, match=key):
        get_method("nirvana", sparsity=0.5, **kw)


def test_infeasible_sparsities_refused_before_work():
    model = llama(heads=4, kv=2, layers=4)
    with pytest.raises(ConfigError, match="KV group"):
        get_method("nirvana", sparsity=0.9, gamma=0.2).check(model)
    with pytest.raises(ConfigError, match="all 4 blocks"):
        get_method("shortgpt", sparsity=0.9).check(model)
    with pytest.raises(ConfigError, match="skip_layers"):
        get_method("llm_pruner", sparsity=0.5, skip_layers=[0, 1, 2], ratio_rule="total").check(model)
    with pytest.raises(ConfigError, match="all 2 KV groups"):  # the public code's count: 2 - int(2 x 0.4) = 2
        get_method("llm_pruner", sparsity=0.6).check(model)
    with pytest.raises(ConfigError, match="skip_layers"):
        get_method("llm_pruner", sparsity=0.5, skip_layers=[7]).check(model)
    t5 = torch.nn.Module()
    t5.config = type("C", (), {"model_type": "t5"})()  # a family without structured support (bert has one now)
    with pytest.raises(ConfigError, match="not 't5'"):
        get_method("wanda_sp", sparsity=0.5).check(t5)


def test_nirvana_scores_gpt2_fused_qkv_equal_brute_force():
    """GPT-2's Conv1D stores (in, out) and fuses q|k|v along the outputs: head h owns output features h*d.. of each
    third of c_attn, input rows h*d.. of attn.c_proj; neuron n owns c_fc output n and mlp.c_proj input n."""
    model, x = tiny_causal_lm("gpt2", seed=0, layers=2), ids()
    twin = copy.deepcopy(model)
    twin(input_ids=x).logits.max(dim=1).values.mean().backward()
    ours = first_order_saliency(model, x, nirvana_objective("seq"))
    n, d, hidden = 4, 16, 64
    for block, tb in zip(get_blocks(model), get_blocks(twin)):
        S = {m: (m.weight.grad * m.weight.detach()).abs().double() for m in (tb.attn.c_attn, tb.attn.c_proj, tb.mlp.c_fc,
                                                                            tb.mlp.c_proj)}
        qkv, proj = S[tb.attn.c_attn], S[tb.attn.c_proj]  # (in, out) as stored
        heads = torch.tensor([sum(float(qkv[:, t * hidden + h * d: t * hidden + (h + 1) * d].sum()) for t in range(3))
                              + float(proj[h * d:(h + 1) * d, :].sum()) for h in range(n)], dtype=torch.float64)
        neurons = S[tb.mlp.c_fc].sum(0) + S[tb.mlp.c_proj].sum(1)
        hs, ns = block_unit_scores(block, model.config, ours)
        torch.testing.assert_close(hs, heads, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ns, neurons, rtol=1e-6, atol=1e-6)
