"""The cost axis: attention MACs on every device, effective MACs and density of pruned weights, the plotted
axes, one run device (CUDA tests skip without a GPU), 2:4 sparse-kernel latency."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from inferno.cost import count_macs, count_macs_effective, density, is_2_4, measure, measure_sparse_latency
from inferno.errors import ConfigError
from inferno.models.hf import tiny_causal_lm
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.pruner import prunable_linears
from inferno.pruning.llm.runner import prune_model
from inferno.run import run
from inferno.tracking import COLUMNS, COST_COLUMNS, read_points

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
FAST = ("logger=none", "hardware.progress_bar=false", "hardware.latency_repeats=2")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ids(T: int, batch: int = 1) -> dict:
    return {"input_ids": torch.arange(T).remainder(256).view(1, -1).expand(batch, -1).contiguous()}


def llama_hand_count(config, T: int) -> tuple[int, int]:
    """(linear MACs of one decoder block, MACs of the whole forward) of a Llama at T tokens, batch 1, from
    its config: every linear in x out x T, and per block QK^T and attention x V, heads x T x T x head_dim
    each (the full T x T, as torch's SDPA formulas count it: the causal half is not subtracted)."""
    H, inter, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = H // heads
    kv = config.num_key_value_heads * head_dim
    block = H * H + H * kv + H * kv + H * H + H * inter + H * inter + inter * H  # q, k, v, o, gate, up, down
    attention = 2 * heads * T * T * head_dim
    return block * T, L * (block * T + attention) + H * V * T  # + lm_head


# ----------------------------------------------------------------------------------- attention MACs
def test_cpu_sdpa_has_torchs_formula():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    with flop_counter.FlopCounterMode(display=False) as c:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert c.get_total_flops() // 2 == 2 * 4 * 32 * 32 * 16  # full T x T although causal


def test_tiny_llama_macs_equal_hand_count_with_attention():
    m = tiny_causal_lm("llama", seed=0, max_positions=512)
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size) == (64, 2, 4, 2, 128, 256)
    _, expected = llama_hand_count(c, 256)
    assert expected == 39_845_888  # 23,068,672 in linears (all that was counted on CPU before) + 16,777,216 attention
    assert count_macs(m, ids(256)) == expected


# ----------------------------------------------------------------------------------- effective MACs, density
def test_linear_with_half_its_weights_zeroed():
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.view(-1)[::2] = 0  # 24 of 48
    x = torch.randn(2, 5, 8)  # 10 rows
    macs, effective = count_macs_effective(lin, x)
    assert macs == 10 * 8 * 6 and effective == 10 * 8 * 6 // 2
    assert density([lin]) == 0.5


def test_transformers_conv1d_counts_too():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs; weight (8, 6)
    with torch.no_grad():
        conv.weight[:4] = 0  # 24 of 48
    assert count_macs_effective(conv, torch.randn(3, 8)) == (3 * 48, 3 * 24)


@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 1), (1, 2)])
def test_conv_with_zeroed_filters(groups, stride):
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=stride, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight[:3] = 0  # 3 of 6 filters
    out = 5 if stride == 1 else 3  # output pixels per side of a 5 x 5 input
    macs = 2 * out * out * 6 * (4 // groups) * 9  # batch 2
    assert count_macs_effective(conv, torch.randn(2, 4, 5, 5)) == (macs, macs // 2)


def test_cnn_effective_macs_subtract_zero_weights_times_positions():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        net[0].weight[0] = 0  # 9 weights x 36 output pixels
        net[3].weight[:, :10] = 0  # 100 weights x 1 row
    c = measure(net, torch.zeros(1, 1, 8, 8), repeats=2)
    assert c.macs == 36 * 4 * 9 + 144 * 10
    assert c.effective_macs == c.macs - 9 * 36 - 100
    assert c.density == pytest.approx(1 - 109 / (36 + 1440)) and c.device == "cpu"


def test_tiny_llama_pruned_half_unstructured():
    m = tiny_causal_lm("llama", seed=0, max_positions=512)
    T = 128
    block_macs, total = llama_hand_count(m.config, T)
    prune_model(m, get_method("magnitude", sparsity=0.5), progress=False)
    prunable = list(prunable_linears(m).values())
    assert len(prunable) == 14
    c = measure(m, ids(T), repeats=2, prunable=prunable)
    assert c.macs == total
    assert c.effective_macs == total - m.config.num_hidden_layers * block_macs // 2
    assert c.density == 0.5
    # default density: every linear, the dense lm_head included
    blocks = sum(mod.weight.numel() for mod in prunable)
    head = m.lm_head.weight.numel()
    assert measure(m, ids(T), repeats=2).density == pytest.approx((blocks / 2 + head) / (blocks + head))


# ----------------------------------------------------------------------------------- 2:4 sparse latency
def test_sparse_latency_skips_on_cpu_with_a_reason():
    m = tiny_causal_lm("llama", seed=0)
    prune_model(m, get_method("magnitude", sparsity=None, pattern="2:4"), progress=False)
    assert all(is_2_4(mod.weight) for mod in prunable_linears(m).values())  # what the kernels would take
    assert not is_2_4(m.lm_head.weight)
    r = measure_sparse_latency(m, ids(64), prunable_linears(m).values(), repeats=2)
    assert r.ms is None and r.dense_ms is None and r.note == "2:4 sparse kernels need a CUDA GPU; the model is on cpu"


@pytest.fixture
def text_task(tmp_path):
    p = tmp_path / "corpus.raw"
    p.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 60)
    return (f"task.path={p}", "task.limit=4", "task.seqlen=64", "pruner.calibration=task", "pruner.nsamples=4",
            "pruner.seqlen=64")


def test_llm_points_carry_cost_columns_and_sparse_note(compose_cfg, tmp_path, text_task):
    cfg = compose_cfg("model=tiny_llama", "task=wikitext2", "pruner=wanda", "pruner.pattern=2:4", *text_task, *FAST)
    assert list(cfg.plot.x_axes) == ["macs", "effective_macs"]
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert list(rows[0])[: len(COLUMNS) + 2] == list(COLUMNS + COST_COLUMNS)
    dense, wanda = rows
    assert float(dense["density"]) == 1.0 and dense["effective_macs"] == dense["macs"]
    assert float(wanda["density"]) == 0.5 and int(wanda["effective_macs"]) < int(wanda["macs"]) == int(dense["macs"])
    assert dense["device"] == wanda["device"] == "cpu"
    assert wanda["latency_ms_sparse"] == "" and "CUDA" in wanda["latency_sparse_note"]
    assert (tmp_path / "curve.png").is_file()


def test_cnn_points_carry_cost_columns(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", "logger=none", "hardware.limit_batches=2")
    assert list(cfg.plot.x_axes) == ["macs", "train_samples"]
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert list(rows[0])[: len(COLUMNS) + 2] == list(COLUMNS + COST_COLUMNS)
    for r in rows:  # structured pruning: dense weights, fewer of them
        assert float(r["density"]) == 1.0 and r["effective_macs"] == r["macs"] and r["device"] == "cpu"


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("axes", ["[macs,flops]", "[]", "macs"])
def test_bad_plot_axes_fail_before_any_model_is_loaded(compose_cfg, tmp_path, axes):
    cfg = compose_cfg("model=tiny_llama", "task=wikitext2", "task.path=/nonexistent.raw", "pruner=wanda",
                      f"plot.x_axes={axes}", "logger=none")
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path)
    msg = str(e.value)
    assert msg.startswith("plot.x_axes: ") and "effective_macs" in msg and "\n" not in msg
    assert not (tmp_path / "points.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_hardware_without_cuda_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-m", "inferno", "experiment=smoke", "hardware=gpu", "logger=none",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: hardware.accelerator: gpu needs a CUDA GPU")


# ----------------------------------------------------------------------------------- CUDA
@GPU
def test_macs_do_not_depend_on_the_device():
    m = tiny_causal_lm("llama", seed=0, max_positions=512)
    cpu = count_macs_effective(m, ids(256))
    assert count_macs_effective(m.cuda(), ids(256)) == cpu == (39_845_888, 39_845_888)


@GPU
def test_sparse_latency_runs_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse kernels need compute capability >= 8.0")
    m = tiny_causal_lm("llama", seed=0).cuda()
    prune_model(m, get_method("magnitude", sparsity=None, pattern="2:4"), device="cuda", progress=False)
    r = measure_sparse_latency(m, ids(128), prunable_linears(m).values(), repeats=3)
    assert r.ms is not None and r.ms > 0 and r.dense_ms > 0, r.note
    assert "14 of 14 layers" in r.note
    assert all(p.dtype == torch.float32 and not p.is_sparse for p in m.parameters())  # the model is untouched


@GPU
def test_llm_cli_runs_on_cuda(shared_data, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-m", "inferno", "model=tiny_llama", "task=wikitext2", "pruner=wanda",
                        "hardware=gpu", "pruner.pattern=2:4", "task.limit=8", "pruner.nsamples=8", "pruner.seqlen=64",
                        *FAST, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_points(tmp_path / "points.csv")
    assert [row["method"] for row in rows] == ["dense", "wanda"]
    assert all(row["device"] == "cuda" for row in rows)
    assert float(rows[1]["density"]) == 0.5 and float(rows[1]["latency_ms"]) > 0
    if torch.cuda.get_device_capability() >= (8, 0):
        assert float(rows[1]["latency_ms_sparse"]) > 0, rows[1]["latency_sparse_note"]


@GPU
def test_cnn_smoke_runs_on_cuda(compose_cfg, tmp_path):
    run(compose_cfg("experiment=smoke", "hardware=gpu", "logger=none", "hardware.limit_batches=2"), tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert [r["method"] for r in rows] == ["dense", "uniform"]
    assert all(r["device"] == "cuda" and float(r["peak_mem_mb"]) > 0 for r in rows)
