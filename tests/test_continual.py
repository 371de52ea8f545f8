"""Continual inference (inferno/models/continual.py, pruner=continual): step outputs equal the offline model's
on the same window, state untouched without updates, a structurally pruned model still exact, MACs by hand."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferno.errors import ConfigError
from inferno.models.continual import TemporalConvNet, frame_conv1d, stream_logits, to_continual
from inferno.pruning.cnn.continual import ContinualPruner, offline_logits, stream_inputs
from inferno.pruning.cnn.uniform import ChannelPruner
from inferno.run import run
from inferno.tracking import read_points


def random_stats(net: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their defaults (so a wrong fold would show)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def windows_of(ids: torch.Tensor, rf: int) -> torch.Tensor:
    """Every window of ``rf`` consecutive ids (``out[i] = ids[i:i + rf]``), by an explicit loop."""
    return torch.stack([ids[i:i + rf] for i in range(len(ids) - rf + 1)])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kernel", ["library", "matmul"])
def test_step_outputs_equal_offline_for_random_kernels_and_paddings(seed, kernel):
    """A stack of 1-D convolutions with random kernel sizes and paddings: after the delay, step ``t``'s output
    is the offline (padded) convolution's output ``t - delay``; computed independently by F.conv1d."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    widths = [rng.randint(2, 6) for _ in range(4)]
    layers = []
    for i in range(3):
        k = rng.randint(1, 5)
        layers += [nn.Conv1d(widths[i], widths[i + 1], k, padding=rng.randint(0, k - 1)), nn.ReLU()]
    seq = nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(2, widths[0], 24)
    ref = x
    for m in seq:  # the offline rule, by hand
        ref = F.conv1d(ref, m.weight, m.bias, padding=m.padding) if isinstance(m, nn.Conv1d) else F.relu(ref)
    step = to_continual(seq, kernel)
    outs = [step.forward_step(x[:, :, t]) for t in range(x.shape[2])]
    delay = int(step.delay)
    assert all(o is None for o in outs[:delay])
    got = torch.stack(outs[delay:], dim=-1)
    n = got.shape[-1]
    assert torch.allclose(got, ref[..., :n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_temporal_net_steps_equal_offline_windows(seed):
    """Random kernels per block: every prediction of the streamed model equals the offline model's logits on
    the window ending at the same input (1e-6), for several stream counts."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kernels = [rng.randint(1, 4) for _ in range(3)]
    net = random_stats(TemporalConvNet(11, 6, [5, 7, 7], kernels, mids=[4, 6, 3]), seed)
    ids = torch.randint(0, 11, (90,))
    rf = net.receptive_field
    assert rf == 1 + sum(2 * (k - 1) for k in kernels)
    ref = net(windows_of(ids, rf))  # prediction i: window ids[i:i + rf]
    for kernel in ("library", "matmul"):
        step = to_continual(net, kernel)
        assert step.delay == rf - 1
        for streams in (1, 4, 7):
            got = stream_logits(step, ids, len(ids) - step.delay, streams)
            assert torch.allclose(got, ref, atol=1e-6, rtol=0), (kernel, streams)


def test_update_state_false_leaves_the_state_bitwise_unchanged():
    torch.manual_seed(0)
    net = random_stats(TemporalConvNet(9, 4, [4, 4], 3), 0)
    step = to_continual(net, "matmul").prepare(3)
    ids = torch.randint(0, 9, (3,))

    def flat(state):
        if isinstance(state, torch.Tensor):
            return [state.clone()]
        if isinstance(state, (list, tuple)):
            return [t for s in state for t in flat(s)]
        return []

    before = flat(step.state(3))
    assert before
    peek = step.step(ids, update_state=False)
    after = flat(step.state(3))
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    taken = step.step(ids)  # the same step with the update gives the same output, and moves the state
    assert torch.equal(peek, taken)
    assert any(not torch.equal(a, b) for a, b in zip(before, flat(step.state(3)), strict=True))


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_structurally_pruned_continual_model_still_equals_offline(ratio):
    torch.manual_seed(1)
    net = random_stats(TemporalConvNet(13, 12, [12, 16, 16], [3, 2, 3]), 1)
    ChannelPruner(net, torch.zeros(1, 32, dtype=torch.long), ratio).step()
    spec = net.spec()
    assert spec["embed_dim"] < 12 and all(c < w for c, w in zip(spec["channels"], [12, 16, 16], strict=True))
    ids = torch.randint(0, 13, (70,))
    ref = net(windows_of(ids, net.receptive_field))
    for kernel in ("library", "matmul"):
        step = to_continual(net, kernel)
        assert torch.allclose(stream_logits(step, ids, len(ids) - step.delay, 5), ref, atol=1e-6, rtol=0)


def test_frame_conv1d_equals_the_padded_frame_convolution():
    torch.manual_seed(2)
    for k in (1, 2, 5):
        w, b, x = torch.randn(6, 4, k), torch.randn(6), torch.randn(3, 4, 1)
        assert torch.allclose(frame_conv1d(x, w, b, padding=k - 1), F.conv1d(x, w, b, padding=k - 1), atol=1e-6)


def test_step_and_offline_macs_equal_the_hand_count():
    """Offline: every conv computes its output positions over the receptive field; a step: one position per
    conv (matmul: k C_in C_out) or the library's k output taps (k^2 C_in C_out); the head once."""
    from inferno.cost import count_macs

    net = TemporalConvNet(10, 8, [8, 12], [3, 2]).eval()  # block 2 has a 1x1 projection (8 -> 12)
    rf = net.receptive_field
    offline = step_mm = step_lib = 10 * 12  # the head
    length = rf
    for block in net.blocks:
        k = block.kernel_size
        for conv in (block.conv1, block.conv2):
            length -= k - 1
            macs = k * conv.in_channels * conv.out_channels
            offline += length * macs
            step_mm += macs
            step_lib += k * macs
        if block.proj is not None:
            offline += length * block.proj.in_channels * block.proj.out_channels
            step_mm += block.proj.in_channels * block.proj.out_channels
            step_lib += block.proj.in_channels * block.proj.out_channels
    assert length == 1
    assert count_macs(net, torch.zeros(1, 32, dtype=torch.long)) == offline
    one = torch.zeros(1, dtype=torch.long)
    assert count_macs(to_continual(net, "matmul").prepare(1), one) == step_mm
    assert count_macs(to_continual(net, "library").prepare(1), one) == step_lib


def test_stream_inputs_align_predictions_with_targets():
    net = TemporalConvNet(7, 4, [4], 3).eval()
    step = to_continual(net)
    window, ids = 9, torch.randint(0, 7, (40,))
    targets = ids[window:]
    inputs = stream_inputs(ids, window, len(targets), step)
    got = stream_logits(step, inputs, len(targets), 3)
    ref = offline_logits(net, ids[:-1].unfold(0, window, 1))
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="task.window"):
        stream_inputs(ids, 3, 10, step)


# ----------------------------------------------------------------------------------- CLI
@pytest.fixture
def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    letters = "abcdefgh \n"
    path = tmp_path / "text.txt"
    path.write_text("".join(letters[int(i)] for i in torch.randint(0, len(letters), (6000,), generator=g)))
    return path


BASE = ["task=shakespeare_chars", "pruner=continual", "task.num_classes=10", "train.dense_epochs=1", "hardware.limit_batches=2",
        "hardware.latency_repeats=1", "hardware.latency_batch_size=4", "hardware.progress_bar=false",
        "logger=none", "task.eval_size=300", "pruner.finetune_epochs=1", "pruner.streams=8"]
FAST = [*BASE, "model=temporal_cnn", "model.embed_dim=8", "model.channels=[8,8]"]


def test_cli_run_records_offline_and_step_points(compose_cfg, tmp_path, text_file):
    cfg = compose_cfg(*FAST, f"task.path={text_file}", "pruner.ratios=[0,0.5]")
    run(cfg, tmp_path)
    points = read_points(tmp_path / "points.csv")
    rows = [(p["method"], p["variant"] or None) for p in points]
    assert rows[0] == ("dense", None)
    assert rows[1:] == [("continual", v) for _ in range(2) for v in ("offline", "step_matmul", "step_library")]
    num = {k: [float(p[k]) for p in points] for k in ("params", "macs", "value")}
    for i in (1, 4):
        assert num["params"][i] == num["params"][i + 1] == num["params"][i + 2]
        assert num["value"][i + 1] == pytest.approx(num["value"][i], abs=1e-9)  # same predictions, same stream
        assert num["value"][i + 2] == pytest.approx(num["value"][i], abs=1e-9)
        assert float(points[i + 1]["max_abs_diff"]) <= 1e-4
        assert num["macs"][i + 1] < num["macs"][i + 2] < num["macs"][i]
        assert float(points[i + 1]["macs_ratio"]) == pytest.approx(num["macs"][i] / num["macs"][i + 1], rel=1e-3)
    assert num["params"][4] < num["params"][1]  # ratio 0.5 is physically smaller


@pytest.mark.parametrize("overrides,match", [
    (["model=resnet20", "task.window=32"], "model: resnet20 is a vision model and cannot run task shakespeare_chars"),
    (["task=digits", "model=microcnn"], "pruner: continual supports temporal models"),
    (["pruner.frame_kernels=[fft]"], "pruner.frame_kernels"),
    (["pruner.check_tol=0"], "pruner.check_tol"),
    (["pruner.ratios=[1.5]"], "pruner.ratios"),
    (["task.window=5"], "task.window: 5 is shorter than the model's receptive field"),
])
def test_cli_errors_are_one_line_and_come_before_training(compose_cfg, tmp_path, text_file, overrides, match):
    if "task=digits" in overrides:  # a vision model on a vision task
        cfg = compose_cfg("pruner=continual", "logger=none", *overrides)
    else:
        temporal = not any(o.startswith("model=") for o in overrides)
        cfg = compose_cfg(*(FAST if temporal else BASE), f"task.path={text_file}", *overrides)
    with pytest.raises(ConfigError, match=match) as err:
        run(cfg, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "dense.safetensors").exists()


def test_bad_options_fail_in_one_line():
    for kwargs, match in [({"importance": "taylor"}, "pruner.importance"), ({"streams": 0}, "pruner.streams"),
                          ({"frame_kernels": "matmul"}, "pruner.frame_kernels"), ({"method": ""}, "pruner.method")]:
        with pytest.raises(ConfigError, match=match):
            ContinualPruner(**kwargs)

