"""Architectures, the cost model and channel surgery: numbers against independent counts."""

import copy

import pytest
import torch

from inferno.config import build
from inferno.cost import TrainingCost, count_macs, count_params, measure, peak_memory_mb
from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.surgery import prune_channels
from inferno.search.moves import rebuild
from inferno.search.supernet import ElasticMicroCNN


def conv_macs(cin, cout, k, hw):
    return cin * cout * k * k * hw * hw


def test_microcnn_macs_match_hand_count():
    # MicroCNN(1, 1, 1), C=8, stem stride 1, 1x16x16 input: count every conv/linear by hand.
    C, hw = 8, 16
    m = MicroCNN(1, 1, 1, C, stem_stride=1, in_channels=1, num_classes=10)
    h = hw // 2  # after the 3x3/2 max-pool
    mid = C // 4
    expected = (
        conv_macs(1, C, 3, hw)  # stem
        + conv_macs(C, mid, 1, h) + conv_macs(mid, mid, 3, h) + conv_macs(mid, C, 1, h)  # bottleneck
        + conv_macs(C, C, 1, h)  # projection shortcut
        + C * max(1, C // 16) * 2  # SE reduce + expand (1x1 on pooled)
        + C * 10  # head
    )
    assert count_macs(m, torch.zeros(1, 1, hw, hw)) == expected


def test_microcnn_shapes_and_thesis_scale():
    for size, stride in ((8, 1), (28, 1), (256, 2)):
        m = MicroCNN(3, 2, 1, 16, stem_stride=stride, in_channels=3 if size == 256 else 1, num_classes=7)
        x = torch.zeros(2, 3 if size == 256 else 1, size, size)
        assert m(x).shape == (2, 7)
    # (B, D, W) = (1, 1, 1), C = 64, the thesis' stem (3x3, stride 3, padding 3), 5 classes, 3x256x256:
    # stem 256 -> 87, max-pool 87 -> 44; conv and linear MACs only.
    m = MicroCNN(1, 1, 1, 64, stem_stride=3, stem_padding=3, in_channels=3, num_classes=5)
    convs = (87 * 87 * 64 * 3 * 9  # stem
             + 44 * 44 * (64 * 16 + 16 * 16 * 9 + 16 * 64 + 64 * 64)  # conv1, conv2, conv3, projection shortcut
             + 64 * 4 * 2 + 64 * 5)  # SE reduce + expand, head
    assert count_macs(m, torch.zeros(1, 3, 256, 256)) == convs == 29_435_392
    # The reference code's table (ptflops, 5 classes) says 32,116,485 for (1, 1, 1): the same convs plus ptflops'
    # counts of BN (2 per element), ReLU and pooling inputs (1 per element) and the head's bias, exactly.
    bn = 2 * (87 * 87 * 64 + 44 * 44 * (16 + 16 + 64 + 64))
    relu_pools = 87 * 87 * 64 + 87 * 87 * 64 + 44 * 44 * 64  # stem ReLU, max-pool input, SE average-pool input
    assert convs + bn + relu_pools + 5 == 32_116_485


def test_microcnn_thesis_macs_match_hand_count(compose_cfg):
    """model=microcnn_thesis at 3x256x256 (5 classes, as in the thesis' reference runs): every conv and linear
    counted by hand. Conv MACs = H_out * W_out * C_out * C_in * k * k / groups; H_out = (H + 2p - k) // s + 1."""
    cfg = compose_cfg("model=microcnn_thesis", "model.in_channels=3", "model.num_classes=5")
    m = cfg.model
    assert (m.stages, m.depth, m.width, m.base_channels) == (5, 5, 4, 64)
    assert (m.stem_kernel, m.stem_stride, m.stem_padding) == (3, 3, 3)
    net = build(cfg, "model")
    stem = net.stem[0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (3, 3), (3, 3))

    def conv(hw, cin, cout, k, groups=1):
        return hw * hw * cout * cin * k * k // groups

    # stem conv: (256 + 2*3 - 3) // 3 + 1 = 87; max-pool 3/2, padding 1: (87 + 2 - 3) // 2 + 1 = 44
    # a stage's first block after the first: 3x3 conv stride 2 padding 1, and its 1x1 stride-2 shortcut, give
    # (44 + 2 - 3) // 2 + 1 = 22 = (44 - 1) // 2 + 1; 22 -> 11; 11 -> (11 - 1) // 2 + 1 = 6; 6 -> 3
    sizes = [44, 22, 11, 6, 3]
    expected = conv(87, 3, 64, 3)  # stem
    cin, hw_in = 64, 44
    for i, hw in enumerate(sizes):
        out = 64 * 4 * 2**i  # C * W * 2^i
        mid, se = out // 4, out // 16
        for j in range(5):  # D blocks
            expected += conv(hw_in, cin, mid, 1)  # conv1 1x1, at the block's input size
            expected += conv(hw, mid, mid, 3)  # conv2 3x3 (stride 2 on a stage's first block after the first)
            expected += conv(hw, mid, out, 1)  # conv3 1x1
            expected += out * se + se * out  # squeeze-and-excitation: two 1x1 convs on the pooled 1x1 map
            if j == 0:
                expected += conv(hw, cin, out, 1)  # projection shortcut (1x1, the stage's stride)
            cin, hw_in = out, hw
    expected += cin * 5  # head: 4096 -> 5
    assert count_macs(net, torch.zeros(1, 3, 256, 256)) == expected
    assert 4.0e9 < expected < 4.1e9  # the reference table's 4.09e9 "FLOPs" (ptflops MACs, BN and pools included)


def test_stem_settings_survive_rebuilds():
    # Search code rebuilds networks as type(net)(spec=..., **net.config): the stem must come back the same.
    x = torch.zeros(1, 3, 40, 40)
    net = MicroCNN(2, 1, 1, 8, stem_kernel=5, stem_stride=3, stem_padding=2, in_channels=3, num_classes=4)
    assert net.config["stem_kernel"] == 5 and net.config["stem_padding"] == 2
    elastic = ElasticMicroCNN(spec=net.spec(), **net.config)
    for other in (rebuild(net), elastic, elastic.extract(None)):
        conv = other.stem[0]
        assert (conv.kernel_size, conv.stride, conv.padding) == ((5, 5), (3, 3), (2, 2))
        assert count_macs(other, x) == count_macs(net, x) and other(x).shape == (1, 4)
    with pytest.raises(ValueError, match="model: MicroCNN needs an integer stem_stride >= 1"):
        MicroCNN(stem_stride=0)


def test_microcnn_rejects_bad_arch():
    with pytest.raises(ValueError, match="model"):
        MicroCNN(2, [1], 1)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_uniform_surgery_equals_narrower_network(ratio):
    # Removing `ratio` of every layer's channels must give exactly the MicroCNN built with C*(1-ratio).
    x = torch.zeros(1, 1, 28, 28)
    m = MicroCNN(2, 2, 2, 32, in_channels=1)
    prune_channels(m, x, ratio)
    ref = MicroCNN(2, 2, 2, int(32 * (1 - ratio)), in_channels=1)
    assert count_params(m) == count_params(ref)
    assert count_macs(m, x) == count_macs(ref, x)
    assert m(x).shape == (1, 10)


def test_resnet20_surgery_and_params():
    x = torch.zeros(1, 3, 32, 32)
    m = ResNet20()
    # 0.27 M parameters with projection shortcuts (the paper's 0.27 M uses identity/padding shortcuts)
    assert 270_000 < count_params(m) < 280_000
    prune_channels(m, x, 0.5)
    ref = ResNet20(base_channels=8)
    assert count_params(m) == count_params(ref) and count_macs(m, x) == count_macs(ref, x)


def test_surgery_keeps_highest_l1_channels():
    # Only the stem conv's channel group: the kept stem filters are the ones with the largest L1 norm
    # (the group's score also sums the coupled BN and consumer weights, so check a stem-only graph).
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )
    with torch.no_grad():
        net[4].weight.zero_()  # the consumer contributes nothing to the group score
        net[0].bias.zero_()
    w = net[0].weight.detach().clone()
    keep = w.abs().sum((1, 2, 3)).argsort(descending=True)[:4].sort().values
    prune_channels(net, torch.zeros(1, 1, 6, 6), 0.5, ignored=[net[4]])
    assert torch.equal(net[0].weight, w[keep])


def test_bad_ratio_names_key():
    with pytest.raises(ConfigError, match=r"pruner.ratios: ratio 1.5 is outside \[0, 1\)"):
        prune_channels(MicroCNN(), torch.zeros(1, 1, 8, 8), 1.5)


def test_pruned_model_is_physically_smaller_and_faster_to_count():
    x = torch.zeros(1, 1, 28, 28)
    m = MicroCNN(2, 2, 2, 32, in_channels=1)
    dense = measure(m, x, latency_batch_size=8, repeats=2)
    p = copy.deepcopy(m)
    prune_channels(p, x, 0.5)
    small = measure(p, x, latency_batch_size=8, repeats=2)
    assert small.params < dense.params / 3 and small.macs < dense.macs / 3
    assert small.peak_mem_mb < dense.peak_mem_mb


def test_peak_memory_counts_weights_and_largest_live_activation():
    lin = torch.nn.Linear(1000, 1000, bias=False)
    x = torch.zeros(1, 1000)
    # weights 4 MB + the 1x1000 input 4 kB resident, the 1x1000 output 4 kB created (the transposed weight is a view)
    assert peak_memory_mb(lin, x) == pytest.approx((1000 * 1000 * 4 + 2 * 1000 * 4) / 2**20, rel=1e-6)


def test_training_cost_accumulates():
    c = TrainingCost()
    c.add(100, 10)
    c.add(50, 4)
    assert (c.samples, c.macs) == (150, 1200)
    d = c.copy()
    d.add(1, 1)
    assert c.samples == 150
