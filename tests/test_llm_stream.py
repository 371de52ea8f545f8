"""model.stream=true: a causal LM pruned and evaluated one decoder block at a time from its safetensors.

Streaming must change nothing but memory: the pruned weights are bitwise those of the in-memory runner, the output
folder loads with transformers and our loader and gives the in-memory pruned model's logits, a CLI run records the
same points; and only one block is ever in memory."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open
from transformers import AutoModelForCausalLM

from inferno.errors import ConfigError
from inferno.models.hf import load_causal_lm, load_pruned, tiny_causal_lm
from inferno.models.stream import INDEX, checkpoint_files, resident_bytes, stream_causal_lm
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import get_blocks, prune_model
from inferno.run import run
from inferno.tracking import read_points

LAYERS = 4
FAST = ("logger=none", "hardware.progress_bar=false", "hardware.latency_repeats=1", "hardware.latency_batch_size=2")
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 60


def calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny random Llama of 4 blocks saved as one model.safetensors and sharded (20 kB shards, with an index)."""
    root = tmp_path_factory.mktemp("stream_models")
    model = tiny_causal_lm("llama", seed=0, layers=LAYERS, max_positions=256)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert (root / "single" / "model.safetensors").is_file() and (root / "sharded" / INDEX).is_file()
    return {"single": root / "single", "sharded": root / "sharded"}


def file_tensors(folder):
    out = {}
    for key, f in checkpoint_files(folder).items():
        with safe_open(str(f), framework="pt") as h:
            out[key] = h.get_tensor(key)
    return out


@pytest.mark.parametrize("name,kw,layout", [
    ("magnitude", {}, "single"),
    ("wanda", {}, "sharded"),
    ("sparsegpt", {}, "sharded"),
    ("wanda", {"pattern": "2:4", "sparsity": None}, "single"),
    ("owl", {}, "sharded"),
])
def test_streaming_prunes_bitwise_like_in_memory(folders, tmp_path, name, kw, layout):
    ids = calib()
    kw = {"sparsity": 0.5} | kw
    dense = load_causal_lm(folders[layout])
    report = prune_model(dense, get_method(name, **kw), ids, progress=False)
    streamed = stream_causal_lm(folders[layout])
    out = tmp_path / "pruned"
    with streamed.block_source.writing(out):
        streamed_report = prune_model(streamed, get_method(name, **kw), ids, progress=False)
    assert streamed_report == report and streamed.block_source.peak_resident == 1
    # HF's sharded layout: one shard per block + one for the rest, and the index
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"model-{k:05d}-of-{LAYERS + 1:05d}.safetensors" for k in range(1, LAYERS + 2)]
    written, expected = file_tensors(out), dense.state_dict()
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)  # bitwise, SparseGPT included
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours = load_pruned(out)
    probe = calib(n=2, seqlen=40, seed=1)
    with torch.no_grad():
        want = dense(input_ids=probe).logits
        assert torch.equal(reloaded(input_ids=probe).logits, want)
        assert torch.equal(ours(input_ids=probe).logits, want)
        assert torch.equal(streamed(input_ids=probe).logits, want)  # the store now reads the pruned folder


def test_only_one_block_is_in_memory_while_streaming(folders, tmp_path):
    """During calibration, pruning and evaluation every block but the running one is on meta: at each block call
    the model holds exactly the non-block weights + one block, in bytes."""
    model = stream_causal_lm(folders["sharded"])
    blocks = get_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    outside = resident_bytes(model)
    assert outside == sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if not n.startswith("model.layers.")) + sum(b.numel() * b.element_size() for b in model.buffers())
    seen = []

    def check(mod, args, kwargs):
        seen.append((sum(not next(b.parameters()).is_meta for b in blocks), resident_bytes(model)))

    for b in blocks:
        b.register_forward_pre_hook(check, with_kwargs=True)
    with model.block_source.writing(tmp_path / "out"):
        prune_model(model, get_method("wanda", sparsity=0.5), calib(), progress=False)
    n_prune = len(seen)
    with torch.no_grad():
        model(input_ids=calib(n=2))
    assert n_prune >= 2 * LAYERS - 1 and len(seen) == n_prune + LAYERS  # statistics + pruned passes, then one forward
    assert {count for count, _ in seen} == {1}
    assert {nbytes for _, nbytes in seen} == {outside + block_bytes}
    assert all(next(b.parameters()).is_meta for b in blocks) and resident_bytes(model) == outside
    total = outside + LAYERS * block_bytes
    assert (outside + block_bytes) / total < 0.45  # 4 blocks of this model: one resident block is this much less


def cli_cfg(compose_cfg, folder, corpus, *extra):
    return compose_cfg("model=hf_causal_lm", f"model.path={folder}", "task=wikitext2", f"task.path={corpus}",
                       "task.limit=4", "task.seqlen=64", "task.tokenizer=null", "pruner.calibration=task",
                       "pruner.nsamples=4", "pruner.seqlen=64", *FAST, *extra)


def test_cli_stream_records_the_in_memory_points(compose_cfg, folders, tmp_path):
    corpus = tmp_path / "corpus.raw"
    corpus.write_text(TEXT)
    rows = {}
    for stream in ("false", "true"):
        run(cli_cfg(compose_cfg, folders["sharded"], corpus, "pruner=sparsegpt", "save=true", f"model.stream={stream}"),
            tmp_path / stream)
        rows[stream] = read_points(tmp_path / stream / "points.csv")
    assert [r["method"] for r in rows["true"]] == ["dense", "sparsegpt"]
    block_mb = sum(p.numel() * 4 for p in tiny_causal_lm("llama", layers=1).model.layers[0].parameters()) / 2**20
    for mem, st in zip(rows["false"], rows["true"]):
        assert st["stream"] == "True"
        for key in ("value", "nll", "eval_tokens", "sparsity", "density", "params", "macs", "effective_macs",
                    "min_layer_sparsity", "max_layer_sparsity", "calib_tokens"):
            assert st.get(key) == mem.get(key), key
        # the cost model counts every weight as in memory, plus the block being read
        assert float(st["peak_mem_mb"]) - float(mem["peak_mem_mb"]) == pytest.approx(block_mb, abs=1e-3)
    assert float(rows["true"][1]["density"]) == pytest.approx(0.5)
    for name in ("sparsity.json", "calibration.json"):
        assert json.loads((tmp_path / "true" / name).read_text()) == json.loads((tmp_path / "false" / name).read_text())
    streamed, in_memory = tmp_path / "true" / "model", tmp_path / "false" / "model"
    assert (streamed / INDEX).is_file() and (streamed / "pruning_report.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(streamed, local_files_only=True).eval()
    b = AutoModelForCausalLM.from_pretrained(in_memory, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=calib(n=2)).logits, b(input_ids=calib(n=2)).logits)
    # save=false: the pruned shards were only needed for the pruned point
    run(cli_cfg(compose_cfg, folders["single"], corpus, "pruner=magnitude", "model.stream=true",
                "pruner.record_dense=false"), tmp_path / "nosave")
    assert [r["method"] for r in read_points(tmp_path / "nosave" / "points.csv")] == ["magnitude"]
    assert not (tmp_path / "nosave" / "model-stream").exists() and not (tmp_path / "nosave" / "model").exists()


def test_stream_errors_are_one_line(compose_cfg, folders, tmp_path):
    corpus = tmp_path / "corpus.raw"
    corpus.write_text(TEXT)
    nothing = tmp_path / "no_weights"
    nothing.mkdir()
    (nothing / "config.json").write_text((folders["single"] / "config.json").read_text())
    cases = [
        (("model=tiny_llama", "model.stream=true", "task=wikitext2", f"task.path={corpus}", "pruner=wanda",
          "pruner.calibration=task"), "model.stream: tiny_llama is built in memory"),
        (cli_cfg_args(folders["single"], corpus, "pruner=flap", "model.stream=true"), "model.stream: flap cannot stream"),
        (cli_cfg_args(folders["single"], corpus, "pruner=mosaic_composite", "model.stream=true"),
         "model.stream: mosaic_composite cannot stream"),
        (cli_cfg_args(nothing, corpus, "pruner=wanda", "model.stream=true"), "model.path: no safetensors weights in"),
        (cli_cfg_args(folders["single"], corpus, "pruner=wanda", "model.stream=true", "model.outliers=true"),
         "model.stream: model.outliers=true"),
    ]
    for overrides, start in cases:
        with pytest.raises(ConfigError) as e:
            run(compose_cfg(*overrides, *FAST), tmp_path / "err")
        msg = str(e.value)
        assert msg.startswith(start) and "\n" not in msg, msg
    assert "allowed: magnitude, wanda, sparsegpt, owl, inferno_task, mosaic" in str(
        pytest.raises(ConfigError, run, compose_cfg(*cases[1][0], *FAST), tmp_path / "err").value)
    assert not (tmp_path / "err" / "points.csv").exists()


def cli_cfg_args(folder, corpus, *extra):
    return ("model=hf_causal_lm", f"model.path={folder}", "task=wikitext2", f"task.path={corpus}", "task.tokenizer=null",
            "pruner.calibration=task", *extra)
