"""Export of structurally pruned models: save_pruned -> load_pruned (or plain from_pretrained where transformers can
express the shapes) gives identical logits and parameter counts, for non-uniform per-layer sizes in every family,
FLAP's added biases and removed blocks; pruning_report.json lists the kept units of the decisions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from inferno.errors import ConfigError
from inferno.models.hf import load_causal_lm, load_pruned, save_pruned, tiny_causal_lm, tiny_config
from inferno.pruning.llm.runner import get_blocks
from inferno.pruning.llm.surgery import BlockDecision, add_bias, apply, remove_blocks

torch.set_num_threads(1)


def make(case: str, layers: int = 3):
    if case == "gqa":
        cfg = tiny_config("llama", heads=8, layers=layers)
        cfg.num_key_value_heads = 2
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()
    return tiny_causal_lm(case, seed=0, layers=layers)


X = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(input_ids=X).logits


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def nonuniform(case):
    kv = 2 if case in ("gqa", "llama", "qwen2", "mistral") else 4
    return {0: BlockDecision(heads=[kv - 1], neurons=list(range(0, 128, 3))),
            2: BlockDecision(heads=[0], neurons=list(range(40, 100)))}


@pytest.mark.parametrize("case", ["gqa", "llama", "qwen2", "mistral", "opt", "gpt2"])
def test_nonuniform_export_reloads_identically(case, tmp_path):
    model = make(case)
    decisions = nonuniform(case)
    structure = {}
    for i, d in decisions.items():
        from inferno.pruning.llm.surgery import remove_from_block

        structure[i] = remove_from_block(get_blocks(model)[i], model.config, d, layer=i)
    save_pruned(model, None, tmp_path, {}, structure=structure, extra={"method": "test"})
    back = load_pruned(tmp_path)
    assert (logits(back) - logits(model)).abs().max() == 0
    assert n_params(back) == n_params(model)
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["loader"] == "inferno.models.hf.load_pruned" and report["method"] == "test"
    for i, d in decisions.items():
        kept = report["structure"][str(i)]
        n_kv = kept["kv_heads"] + len(d.heads)
        assert kept["kv_heads_kept"] == sorted(set(range(n_kv)) - set(d.heads))
        assert kept["neurons_kept"] == sorted(set(range(128)) - set(d.neurons))
    assert (logits(load_causal_lm(tmp_path)) - logits(model)).abs().max() == 0  # the conf builder's path too


def test_uniform_llama_reloads_with_plain_from_pretrained(tmp_path):
    model = make("gqa")
    apply(model, {i: BlockDecision(heads=[1], neurons=list(range(0, 128, 2))) for i in range(3)})
    save_pruned(model, None, tmp_path, {})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "pruned_layers" not in cfg and cfg["num_key_value_heads"] == 1 and cfg["num_attention_heads"] == 4
    assert cfg["intermediate_size"] == 64 and cfg["head_dim"] == 8
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(back) - logits(model)).abs().max() == 0 and n_params(back) == n_params(model)
    assert json.loads((tmp_path / "pruning_report.json").read_text())["loader"] == "AutoModelForCausalLM.from_pretrained"


def test_added_biases_round_trip(tmp_path):
    model = make("llama")
    apply(model, {1: BlockDecision(heads=[0], neurons=[1, 2, 3])})
    for block in get_blocks(model):
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            add_bias(lin).data.normal_()
    save_pruned(model, None, tmp_path, {})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert len(cfg["pruned_biases"]) == 6 and "model.layers.0.self_attn.o_proj" in cfg["pruned_biases"]
    back = load_pruned(tmp_path)
    assert back.model.layers[2].mlp.down_proj.bias is not None and back.model.layers[0].self_attn.q_proj.bias is None
    assert (logits(back) - logits(model)).abs().max() == 0


def test_remove_blocks_skips_them_and_exports_plainly(tmp_path):
    model = make("llama", layers=4)
    identity = copy.deepcopy(model)  # blocks 1 and 3 made the identity: zero o_proj and down_proj
    with torch.no_grad():
        for i in (1, 3):
            identity.model.layers[i].self_attn.o_proj.weight.zero_()
            identity.model.layers[i].mlp.down_proj.weight.zero_()
    remove_blocks(identity, [1, 3])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (1, 3):
            ref.model.layers[i].self_attn.o_proj.weight.zero_()
            ref.model.layers[i].mlp.down_proj.weight.zero_()
    assert (logits(identity) - logits(ref)).abs().max() < 1e-5
    assert [b.self_attn.layer_idx for b in identity.model.layers] == [0, 1]
    assert identity.config.num_hidden_layers == 2 and identity.config.removed_layers == [1, 3]
    remove_blocks(identity, [0])  # cumulative, in the original numbering
    assert identity.config.removed_layers == [0, 1, 3]
    out = identity.generate(X[:1], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 17)
    save_pruned(identity, None, tmp_path, {}, structure={})
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(back) - logits(identity)).abs().max() == 0
    assert json.loads((tmp_path / "pruning_report.json").read_text())["removed_blocks"] == [0, 1, 3]


def test_remove_blocks_bad_input():
    model = make("llama", layers=2)
    with pytest.raises(ValueError, match="all 2 blocks"):
        remove_blocks(model, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        remove_blocks(model, [5])
    with pytest.raises(ValueError, match="duplicate"):
        remove_blocks(model, [0, 0])
    assert len(get_blocks(model)) == 2


def test_load_pruned_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_pruned(tmp_path / "nothing")
