"""Structured surgery (inferno.pruning.llm.surgery): the removed model computes the masked model's function,
has exactly the expected parameter count and keeps the original weights at the kept indices."""

from __future__ import annotations

import copy

import pytest
import torch

from inferno.models.hf import tiny_causal_lm, tiny_config
from inferno.pruning.llm.runner import get_blocks
from inferno.pruning.llm.surgery import BlockDecision, apply, block_units, mask_block, remove_from_block

torch.set_num_threads(1)

LAYERS = 3
HIDDEN = 64
INTER = 128
CASES = ["llama", "qwen2", "mistral", "gqa", "opt", "gpt2"]


def make(case: str):
    if case == "gqa":  # 8 query heads sharing 2 KV heads: g = 4, head_dim 8
        from transformers import AutoModelForCausalLM

        config = tiny_config("llama", heads=8, layers=LAYERS)
        config.num_key_value_heads = 2
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()
    return tiny_causal_lm(case, seed=0, layers=LAYERS)


def sizes(case: str):
    """(n_heads, n_kv_heads, head_dim), from how the test builds the models."""
    heads, kv = {"gqa": (8, 2), "opt": (4, 4), "gpt2": (4, 4)}.get(case, (4, 2))
    return heads, kv, HIDDEN // heads


def decisions(case: str, seed: int = 0) -> dict[int, BlockDecision]:
    """One KV head and 30 / 40 / 50 % of the neurons per block, random but seeded, different per block."""
    _, kv, _ = sizes(case)
    out = {}
    for i in range(LAYERS):
        g = torch.Generator().manual_seed(seed * 100 + i)
        head = int(torch.randint(kv, (1,), generator=g))
        neurons = torch.randperm(INTER, generator=g)[: int(INTER * (0.3 + 0.1 * i))].tolist()
        out[i] = BlockDecision(heads=[head], neurons=neurons)
    return out


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding in the first row
    return ids, mask


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- independent bookkeeping
# Per family, the HF layout restated by name: attention linears whose output rows belong to a KV head (with
# the rows per KV head as a multiple of head_dim: g for q, 1 for k/v), the one whose input columns do
# (g * head_dim per KV head), and the MLP's row / column linears. GPT-2 (fused Conv1D) is handled apart.
def layout(case: str):
    heads, kv, _ = sizes(case)
    g = heads // kv
    if case == "opt":
        return "self_attn", {"q_proj": 1, "k_proj": 1, "v_proj": 1}, ("out_proj", 1), "", ["fc1"], "fc2"
    return "self_attn", {"q_proj": g, "k_proj": 1, "v_proj": 1}, ("o_proj", g), "mlp", ["gate_proj", "up_proj"], "down_proj"


def expected_params(case: str, dense, decs) -> int:
    _, _, d = sizes(case)
    removed = 0
    for i, dec in decs.items():
        block = get_blocks(dense)[i]
        nh, nn_ = len(dec.heads), len(dec.neurons)
        if case == "gpt2":
            removed += 3 * nh * d * HIDDEN + 3 * nh * d  # c_attn: q, k, v output features + bias
            removed += nh * d * HIDDEN  # attn.c_proj input features (its bias is per output: kept)
            removed += nn_ * HIDDEN + nn_  # c_fc output features + bias
            removed += nn_ * HIDDEN  # mlp.c_proj input features
            continue
        attn_name, rows, (_, col_mult), mlp_name, mlp_rows, _ = layout(case)
        attn = block.get_submodule(attn_name)
        mlp = block.get_submodule(mlp_name) if mlp_name else block
        for name, mult in rows.items():
            lin = getattr(attn, name)
            removed += nh * mult * d * (HIDDEN + (lin.bias is not None))
        removed += nh * col_mult * d * HIDDEN
        for name in mlp_rows:
            lin = getattr(mlp, name)
            removed += nn_ * (HIDDEN + (lin.bias is not None))
        removed += nn_ * HIDDEN
    return n_params(dense) - removed


def kept_units(n: int, removed: list[int]) -> torch.Tensor:
    return torch.tensor([u for u in range(n) if u not in removed])


def check_kept_weights(case: str, dense, pruned, decs) -> None:
    _, kv, d = sizes(case)
    for i, dec in decs.items():
        old, new = get_blocks(dense)[i], get_blocks(pruned)[i]
        kh, kn = kept_units(kv, dec.heads), kept_units(INTER, dec.neurons)
        if case == "gpt2":  # Conv1D weights are (in, out); c_attn's outputs are [q | k | v], heads inside each
            w = old.attn.c_attn.weight.view(HIDDEN, 3, kv, d)[:, :, kh].reshape(HIDDEN, -1)
            assert torch.equal(new.attn.c_attn.weight, w)
            b = old.attn.c_attn.bias.view(3, kv, d)[:, kh].reshape(-1)
            assert torch.equal(new.attn.c_attn.bias, b)
            assert torch.equal(new.attn.c_proj.weight, old.attn.c_proj.weight.view(kv, d, HIDDEN)[kh].reshape(-1, HIDDEN))
            assert torch.equal(new.attn.c_proj.bias, old.attn.c_proj.bias)
            assert torch.equal(new.mlp.c_fc.weight, old.mlp.c_fc.weight[:, kn])
            assert torch.equal(new.mlp.c_fc.bias, old.mlp.c_fc.bias[kn])
            assert torch.equal(new.mlp.c_proj.weight, old.mlp.c_proj.weight[kn])
            continue
        attn_name, rows, (col, col_mult), mlp_name, mlp_rows, mlp_col = layout(case)
        oa, na = old.get_submodule(attn_name), new.get_submodule(attn_name)
        om = old.get_submodule(mlp_name) if mlp_name else old
        nm = new.get_submodule(mlp_name) if mlp_name else new
        for name, mult in rows.items():
            o, n = getattr(oa, name), getattr(na, name)
            assert torch.equal(n.weight, o.weight.view(kv, mult * d, HIDDEN)[kh].reshape(-1, HIDDEN)), name
            if o.bias is not None:
                assert torch.equal(n.bias, o.bias.view(kv, mult * d)[kh].reshape(-1)), name
        o, n = getattr(oa, col), getattr(na, col)
        assert torch.equal(n.weight, o.weight.view(HIDDEN, kv, col_mult * d)[:, kh].reshape(HIDDEN, -1))
        if o.bias is not None:
            assert torch.equal(n.bias, o.bias)
        for name in mlp_rows:
            o, n = getattr(om, name), getattr(nm, name)
            assert torch.equal(n.weight, o.weight[kn]), name
            if o.bias is not None:
                assert torch.equal(n.bias, o.bias[kn]), name
        assert torch.equal(getattr(nm, mlp_col).weight, getattr(om, mlp_col).weight[:, kn])


# ----------------------------------------------------------------------------------- tests
MAX_DIFFS: dict = {}


@pytest.mark.parametrize("case", CASES)
def test_removed_equals_masked(case):
    dense = make(case)
    decs = decisions(case)
    masked, removed = copy.deepcopy(dense), copy.deepcopy(dense)
    report_mask = apply(masked, decs, mode="mask")
    report = apply(removed, decs, mode="remove")

    heads, kv, _ = sizes(case)
    g = heads // kv
    for i, dec in decs.items():
        expect = {"kv_heads": kv - 1, "q_heads": (kv - 1) * g, "neurons": INTER - len(dec.neurons)}
        assert report[i] == expect == report_mask[i]
        assert block_units(get_blocks(removed)[i], removed.config)["neurons"] == INTER - len(dec.neurons)
    assert len({r["neurons"] for r in report.values()}) == LAYERS  # per-layer sizes really differ

    ids, mask = inputs()
    for m in (None, mask):
        out_m, out_r, out_d = logits(masked, ids, m), logits(removed, ids, m), logits(dense, ids, m)
        diff = (out_m - out_r).abs().max().item()
        MAX_DIFFS[(case, m is not None)] = diff
        assert diff < 1e-5, (case, diff)
        assert (out_m - out_d).abs().max().item() > 1e-2  # the masking changed the function: not vacuous

    assert n_params(masked) == n_params(dense)
    assert n_params(removed) == expected_params(case, dense, decs)
    check_kept_weights(case, dense, removed, decs)


@pytest.mark.parametrize("case", CASES)
def test_config_records_per_layer_sizes(case):
    model = make(case)
    before = model.config.to_dict()
    decs = decisions(case)
    apply(model, decs)
    heads, kv, _ = sizes(case)
    g = heads // kv
    assert model.config.pruned_layers == {
        str(i): {"num_attention_heads": (kv - 1) * g, "num_key_value_heads": kv - 1,
                 "intermediate_size": INTER - len(d.neurons)}
        for i, d in decs.items()
    }
    after = model.config.to_dict()
    after.pop("pruned_layers")
    assert after == before  # the global sizes still describe the unpruned model


@pytest.mark.parametrize("case", CASES)
def test_generate_removed_matches_masked(case):
    dense = make(case)
    decs = decisions(case, seed=3)
    masked, removed = copy.deepcopy(dense), copy.deepcopy(dense)
    apply(masked, decs, mode="mask")
    apply(removed, decs, mode="remove")
    ids, mask = inputs()
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    with torch.no_grad():
        a = removed.generate(ids, **kw)
        b = masked.generate(ids, **kw)
    assert a.shape == (2, 20)
    assert torch.equal(a, b)


def test_remove_twice_uses_current_numbering():
    """A second removal indexes the already-shrunk block; the result equals one removal of the union."""
    dense = make("llama")
    once, twice = copy.deepcopy(dense), copy.deepcopy(dense)
    apply(once, {0: BlockDecision(heads=[0], neurons=[3, 10, 20, 21])})
    apply(twice, {0: BlockDecision(heads=[], neurons=[3, 10])})
    # neurons 20, 21 of the original are now 18, 19 (the current size is 126); head 0 is still head 0
    r = remove_from_block(get_blocks(twice)[0], twice.config, BlockDecision(heads=[0], neurons=[18, 19]))
    assert r["neurons_kept"] == list(range(18)) + list(range(20, 126)) and r["heads_kept"] == [1]
    for a, b in zip(once.state_dict().values(), twice.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["llama", "opt"])
def test_removing_all_neurons_skips_the_mlp(case):
    dense = make(case)
    decs = {1: BlockDecision(neurons=list(range(INTER)))}
    masked, removed = copy.deepcopy(dense), copy.deepcopy(dense)
    apply(masked, decs, mode="mask")
    assert apply(removed, decs, mode="remove")[1]["neurons"] == 0
    ids, mask = inputs()
    assert (logits(masked, ids, mask) - logits(removed, ids, mask)).abs().max().item() < 1e-5


def test_dtype_and_requires_grad_kept():
    model = make("qwen2").to(torch.float64)
    model.model.layers[0].self_attn.k_proj.weight.requires_grad_(False)
    apply(model, decisions("qwen2"))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    attn = model.model.layers[0].self_attn
    assert not attn.k_proj.weight.requires_grad and attn.q_proj.weight.requires_grad
    assert attn.k_proj.out_features == attn.k_proj.weight.shape[0] == 16  # 1 of 2 KV heads, head_dim 16


@pytest.mark.parametrize("mode", ["remove", "mask"])
@pytest.mark.parametrize(
    "decision, message",
    [
        (BlockDecision(heads=[2]), r"layer 1: KV head indices \[2\] out of range"),
        (BlockDecision(neurons=[128]), r"layer 1: neuron indices \[128\] out of range"),
        (BlockDecision(neurons=[-1]), r"layer 1: neuron indices \[-1\] out of range"),
        (BlockDecision(heads=[1, 1]), r"layer 1: duplicate KV head indices \[1\]"),
        (BlockDecision(neurons=[4, 5, 4]), r"layer 1: duplicate neuron indices \[4\]"),
        (BlockDecision(heads=[0, 1]), r"cannot remove all 2 KV heads of layer 1; keep at least one"),
        (BlockDecision(heads=[0.5]), r"layer 1: KV head index 0.5 is not an integer"),
    ],
)
def test_errors_name_the_layer(mode, decision, message):
    model = make("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        apply(model, {0: BlockDecision(heads=[0]), 1: decision}, mode=mode)
    for k, v in model.state_dict().items():  # validated before anything changed (layer 0 too)
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match=message):  # block-level calls name the layer from layer_idx
        (remove_from_block if mode == "remove" else mask_block)(get_blocks(model)[1], model.config, decision)


def test_bad_layer_and_mode():
    model = make("gpt2")
    with pytest.raises(ValueError, match="layer 7 out of range"):
        apply(model, {7: BlockDecision(heads=[0])})
    with pytest.raises(ValueError, match="mode must be"):
        apply(model, {0: BlockDecision(heads=[0])}, mode="prune")
    with pytest.raises(ValueError, match="cannot remove all 4 KV heads of layer 0"):
        apply(model, {0: BlockDecision(heads=[0, 1, 2, 3])})
    with pytest.raises(ValueError, match="cannot remove all 128 MLP neurons of layer 1"):  # Conv1D: no 0-size
        apply(model, {1: BlockDecision(neurons=list(range(INTER)))}, mode="mask")


def test_report_max_diffs(capsys):
    """Print the measured max |masked - removed| (run after the parametrized test in the same session)."""
    if MAX_DIFFS:
        with capsys.disabled():
            print("\nmax |masked - removed| logits:", {f"{c}{'+mask' if m else ''}": f"{v:.1e}" for (c, m), v in MAX_DIFFS.items()})
