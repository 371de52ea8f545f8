"""The sequential calibration runner: captured inputs, propagation, resume, families, save/reload."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM

from inferno.models.hf import FAMILIES, load_causal_lm, save_pruned, tiny_causal_lm
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import (
    LayerInputs,
    capture_inputs,
    find_linears,
    get_blocks,
    get_weight,
    prune_layers,
    prune_model,
    run_layers,
)


def calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def masks(model):
    return {n: (p != 0) for n, p in model.named_parameters() if p.dim() == 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_reproduces_the_models_own_block_outputs(family):
    """Captured inputs (masks, positions, rotary) + the runner's forward == the model's own forward."""
    model = tiny_causal_lm(family, seed=0)
    ids = calib(n=4)
    blocks = get_blocks(model)
    seen = []
    hook = blocks[1].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(ids, use_cache=False)
    hook.remove()
    state = capture_inputs(model, ids, batch_size=3)  # chunks of 3 + 1
    assert [h.shape[0] for h in state.hidden] == [3, 1]
    run_layers(model, state, [0], process=lambda block: False, progress=False)
    assert state.next_layer == 1
    assert torch.allclose(torch.cat(state.hidden), seen[0], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name,kw", [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("wanda", {"pattern": "2:4"})]
)
def test_every_family_prunes_to_target(family, name, kw):
    model = tiny_causal_lm(family, seed=0)
    n_linears = sum(len(find_linears(b)) for b in get_blocks(model))
    report = prune_model(model, get_method(name, sparsity=0.5, **kw), calib(), progress=False)
    assert len(report) == n_linears
    assert all(v == 0.5 for v in report.values()), report
    for lname, value in report.items():
        assert float((get_weight(model.get_submodule(lname)) == 0).float().mean()) == value
    with torch.no_grad():
        assert torch.isfinite(model(calib(seed=1)).logits).all()


def test_uniform_row_rounding_is_exact_per_row():
    model = tiny_causal_lm("llama", seed=0)
    prune_model(model, get_method("wanda", sparsity=0.3), calib(), progress=False)
    for b in get_blocks(model):
        for lin in find_linears(b).values():
            zeros = (lin.weight == 0).sum(dim=1)
            assert (zeros == math.floor(0.3 * lin.weight.shape[1] + 0.5)).all()


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_one_pass_equals_resumed_layer_by_layer(name, tmp_path):
    ids = calib()
    a = tiny_causal_lm("llama", seed=0, layers=3)
    b = tiny_causal_lm("llama", seed=0, layers=3)
    report_a = prune_model(a, get_method(name, sparsity=0.5), ids, progress=False)

    state = capture_inputs(b, ids)
    report_b = prune_layers(b, get_method(name, sparsity=0.5), state, layers=range(1), progress=False)
    state.save(tmp_path / "state.pt")  # e.g. a job stopped after block 0 ...
    resumed = LayerInputs.load(tmp_path / "state.pt")
    assert resumed.next_layer == 1
    report_b |= prune_layers(b, get_method(name, sparsity=0.5), resumed, progress=False)  # ... and resumed

    assert report_a == report_b
    ma, mb = masks(a), masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_out_of_order_layers_rejected():
    model = tiny_causal_lm("llama", seed=0)
    state = capture_inputs(model, calib())
    with pytest.raises(ValueError, match="in order"):
        prune_layers(model, get_method("wanda"), state, layers=[1], progress=False)


def test_propagation_uses_pruned_outputs():
    """Block 1's Wanda scores use inputs produced by the *pruned* block 0."""
    model = tiny_causal_lm("llama", seed=0)
    dense_w = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    ids = calib()
    prune_model(model, get_method("wanda", sparsity=0.5), ids, progress=False)
    xs = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)  # q_proj's inputs depend only on block 0 (pruned) and block 1's norm
    h.remove()
    metric = dense_w.abs() * torch.cat(xs).pow(2).sum(0).sqrt()
    expect = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, metric.topk(32, dim=1).indices, True)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight != 0, expect)


def test_list_of_variable_length_inputs_and_magnitude_without_data():
    model = tiny_causal_lm("qwen2", seed=0)
    ids = [torch.randint(0, 256, (L,)) for L in (16, 24, 9)]
    state = capture_inputs(model, ids)
    assert [h.shape[1] for h in state.hidden] == [16, 24, 9]
    report = prune_model(model, get_method("wanda", sparsity=0.5), ids, progress=False)
    assert set(report.values()) == {0.5}
    model2 = tiny_causal_lm("qwen2", seed=0)
    assert set(prune_model(model2, get_method("magnitude", sparsity=0.5), None, progress=False).values()) == {0.5}
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model(model2, get_method("wanda"), None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_pruned_model_reloads_with_identical_logits(family, tmp_path):
    model = tiny_causal_lm(family, seed=0)
    report = prune_model(model, get_method("sparsegpt", sparsity=0.5), calib(), progress=False)
    out = save_pruned(model, None, tmp_path / "pruned", report)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["layers"] == report and saved["mean_layer_sparsity"] == pytest.approx(0.5)
    again = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ev = calib(seed=2)
    with torch.no_grad():
        assert torch.equal(model(ev).logits, again(ev).logits)
    assert all(torch.equal(m, n) for m, n in zip(masks(model).values(), masks(again).values()))
    loaded = load_causal_lm(out, dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ev).logits, loaded(ev).logits)


def test_load_missing_folder_is_clear():
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_causal_lm("/nonexistent/llama-2-7b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_model_pruned_on_gpu_layer_by_layer():
    model = tiny_causal_lm("llama", seed=0)
    report = prune_model(model, get_method("sparsegpt", sparsity=0.5), calib(), device="cuda", progress=False)
    assert set(report.values()) == {0.5}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    with torch.no_grad():
        assert torch.isfinite(model(calib(seed=1)).logits).all()
