"""The block-level method interface of the one calibration runner, and shared statistics.

A toy block-level method (drop each block's lowest-activation MLP neurons and its weakest KV group) run through
``prune_model`` with ``apply="remove"`` gives the logits of the same method with ``apply="mask"`` (rows and
columns zeroed, shapes kept) with fewer parameters -- for Llama and a GQA config (8 query heads, 2 KV heads)."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM

from inferno.models.hf import tiny_causal_lm, tiny_config
from inferno.pruning.llm.methods import BlockMethod, get_method
from inferno.pruning.llm.runner import capture_inputs, get_blocks, prune_model, run_layers
from inferno.pruning.llm.surgery import BlockDecision


def calib(n=8, seqlen=32, seed=0, vocab=256):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


class LowestNorm(BlockMethod):
    """Toy block-level method: remove the ``sparsity`` fraction of MLP neurons whose activations (the input of
    down_proj) have the lowest L2 norm over the calibration tokens, and the KV group whose heads' outputs
    (the input columns of o_proj) have the lowest norm."""

    name = "lowest_norm"

    def __init__(self, sparsity=0.5, apply="remove", heads=1):
        super().__init__(sparsity, apply)
        self.heads, self.decisions = heads, {}

    def prune_block(self, block):
        cfg = block.config
        neuron_norms = block.stats["mlp.down_proj"].norms
        n_drop = round(self.sparsity * neuron_norms.numel())
        neurons = torch.argsort(neuron_norms, stable=True)[:n_drop].tolist()
        d = cfg.hidden_size // cfg.num_attention_heads
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        per_group = block.stats["self_attn.o_proj"].norms.view(-1, g * d).norm(dim=1)  # (kv heads,)
        heads = torch.argsort(per_group, stable=True)[: self.heads].tolist()
        self.decisions[block.index] = (sorted(heads), sorted(neurons))
        return BlockDecision(heads=heads, neurons=neurons)


def gqa_llama(seed=0):
    cfg = tiny_config("llama", hidden=64, heads=8, layers=2, intermediate=128, max_positions=128)
    cfg.num_key_value_heads = 2
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("build", [lambda: tiny_causal_lm("llama", seed=0), gqa_llama], ids=["llama", "gqa_8q_2kv"])
def test_block_method_removed_equals_masked(build):
    dense = build()
    masked, removed = copy.deepcopy(dense), copy.deepcopy(dense)
    m_mask, m_remove = LowestNorm(0.5, "mask"), LowestNorm(0.5, "remove")
    prune_model(masked, m_mask, calib(), progress=False)
    prune_model(removed, m_remove, calib(), progress=False)
    assert m_mask.decisions == m_remove.decisions  # the same decisions, block after block

    ids = calib(n=2, seqlen=24, seed=5)
    with torch.no_grad():
        lm, lr, ld = masked(ids).logits, removed(ids).logits, dense(ids).logits
    assert (lm - lr).abs().max().item() < 1e-5
    assert (lm - ld).abs().max().item() > 1e-3  # the pruning did change the function

    cfg = dense.config
    d = cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    n_dense = sum(p.numel() for p in dense.parameters())
    expected = n_dense
    for heads, neurons in m_remove.decisions.values():
        # a KV group: k and v rows (d each) + its g query heads' q rows and o columns (g*d each), all x hidden
        expected -= len(heads) * (2 * d + 2 * g * d) * cfg.hidden_size
        expected -= len(neurons) * 3 * cfg.hidden_size  # gate and up rows, down column
    assert sum(p.numel() for p in removed.parameters()) == expected < n_dense
    for i, (heads, neurons) in m_remove.decisions.items():
        block = get_blocks(removed)[i]
        assert block.mlp.down_proj.in_features == cfg.intermediate_size - len(neurons)
        assert block.self_attn.k_proj.out_features == (cfg.num_key_value_heads - len(heads)) * d
        assert m_remove.structure[i]  # the surgery's per-layer report is kept


def test_unknown_apply_is_a_one_line_error():
    from inferno.errors import ConfigError

    with pytest.raises(ConfigError, match="pruner.apply"):
        LowestNorm(0.5, "shrink")


@pytest.mark.parametrize("family,groups", [("llama", 4), ("opt", 4), ("gpt2", 4), ("qwen2", 4)])
def test_linears_reading_one_input_share_one_collector(family, groups):
    """q/k/v (and gate/up) read the same tensor: one collector each, fed once per chunk, equal to what a
    collector of its own would have seen; pruning is bit-identical with and without sharing."""
    model = tiny_causal_lm(family, seed=0)
    seen = {}

    def process(b):
        seen[b.index] = (dict(b.shared), {n: id(s) for n, s in b.stats.items()}, b.stats)
        return False

    from inferno.pruning.llm.scores import InputNorms

    state = capture_inputs(model, calib(), batch_size=3)
    run_layers(model, state, range(2), process, lambda n, m: InputNorms(m.weight.shape[-1] if family != "gpt2" else m.weight.shape[0]), progress=False)
    for shared, ids, _ in seen.values():
        assert len(set(ids.values())) == groups
    shared, _, stats = seen[0]
    if family in ("llama", "qwen2"):
        assert shared["self_attn.k_proj"] == shared["self_attn.v_proj"] == "self_attn.q_proj"
        assert shared["mlp.up_proj"] == "mlp.gate_proj" and shared["mlp.down_proj"] == "mlp.down_proj"
        assert stats["self_attn.q_proj"].tokens == 8 * 32  # fed once per chunk, not three times
    # bit-identical pruning with and without sharing
    for name in ("wanda", "sparsegpt"):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        shared_method, own_method = get_method(name, sparsity=0.5), get_method(name, sparsity=0.5)
        own_method.share_stats = False
        prune_model(a, shared_method, calib(), progress=False)
        prune_model(b, own_method, calib(), progress=False)
        for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), na



@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_statistics_pass_stops_at_the_last_linear_without_changing_results(family):
    """The statistics pass ends each chunk (after the first) at the last linear's input, and the final block is
    not rerun after pruning; the pruned weights are bit-identical to full passes."""
    from inferno.pruning.llm.runner import find_linears

    model = tiny_causal_lm(family, seed=0)
    runs = {}
    for needs_outputs in (False, True):
        net = copy.deepcopy(model)
        last = list(find_linears(get_blocks(net)[0]))[-1]
        counts = [0, 0]
        for i, block in enumerate(get_blocks(net)):
            block.get_submodule(last).register_forward_hook(lambda m, a, o, i=i, c=counts: c.__setitem__(i, c[i] + 1))
        method = get_method("sparsegpt", sparsity=0.5)
        method.needs_outputs = needs_outputs
        prune_model(net, method, calib(n=9), batch_size=3, progress=False)  # 3 chunks
        runs[needs_outputs] = (net, counts)
    # block 0: statistics pass (first chunk only, or all 3) + 3 propagation chunks; block 1 (the last): no propagation
    assert runs[False][1] == [1 + 3, 1] and runs[True][1] == [3 + 3, 3]
    for (name, p), (_, q) in zip(runs[False][0].named_parameters(), runs[True][0].named_parameters()):
        assert torch.equal(p, q), name
