"""Architectures, the cost model and channel surgery: numbers against independent counts."""

import copy

import pytest
import torch

from inferno.cost import TrainingCost, count_macs, count_params, measure, peak_memory_mb
from inferno.errors import ConfigError
from inferno.models.microcnn import MicroCNN
from inferno.models.resnet20 import ResNet20
from inferno.pruning.cnn.surgery import prune_channels


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
    # (B, D, W) = (1, 1, 1), C = 64 at 3x256x256: stem stride 4 gives 15.79 M MACs = 31.6 MFLOPs,
    # the scale of the thesis' "about 32.1 M" (which counts FLOPs, or the stem differently).
    m = MicroCNN(1, 1, 1, 64, stem_stride=4, in_channels=3, num_classes=1000)
    assert 15.7e6 < count_macs(m, torch.zeros(1, 3, 256, 256)) < 15.9e6


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
