"""Mask rules and the skewness allocation, checked against numbers computed here independently."""

import math
import statistics

import pytest
import torch

from inferno.pruning.llm.masks import achieved_sparsity, apportion, keep_mask, parse_pattern
from inferno.pruning.llm.scores import row_skewness, skewness_row_sparsity


def distinct_scores(out=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g).abs()


# Rounding rule: a row of n weights at sparsity s loses exactly round-half-up(s * n) weights.
@pytest.mark.parametrize("s,expected_zeros", [(0.3, 19), (0.5, 32), (0.7, 45), (0.0, 0)])
def test_row_group_prunes_exact_count_of_lowest(s, expected_zeros):
    scores = distinct_scores()
    mask = keep_mask(scores, s, group="row")
    assert ((~mask).sum(dim=1) == expected_zeros).all()
    for r in range(scores.shape[0]):
        expect = set(sorted(range(64), key=lambda j: float(scores[r, j]))[:expected_zeros])
        assert set(torch.nonzero(~mask[r]).flatten().tolist()) == expect


def test_layer_group_prunes_global_lowest():
    scores = distinct_scores()
    mask = keep_mask(scores, 0.37, group="layer")
    k = math.floor(0.37 * scores.numel() + 0.5)
    assert int((~mask).sum()) == k
    threshold = scores.flatten().sort().values[k - 1]
    assert bool((scores[~mask] <= threshold).all()) and bool((scores[mask] > threshold).all())
    # rows are not balanced in layer mode
    assert len(set((~mask).sum(dim=1).tolist())) > 1


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_keeps_exactly_n_largest_per_group(pattern, n, m):
    scores = distinct_scores(cols=64)
    mask = keep_mask(scores, 0.0, pattern=pattern)
    groups = mask.reshape(16, 64 // m, m)
    assert (groups.sum(dim=2) == n).all()
    sg = scores.reshape(16, 64 // m, m)
    kept_min = torch.where(groups, sg, torch.full_like(sg, float("inf"))).min(dim=2).values
    pruned_max = torch.where(~groups, sg, torch.full_like(sg, -float("inf"))).max(dim=2).values
    assert (kept_min > pruned_max).all()
    w = torch.randn(16, 64) * mask
    assert achieved_sparsity(w) == pytest.approx(1 - n / m)


def test_per_row_vector_sparsity():
    scores = distinct_scores(out=10, cols=50)
    rows = torch.linspace(0.1, 0.9, 10)
    mask = keep_mask(scores, rows)
    pruned = (~mask).sum(dim=1)
    assert int(pruned.sum()) == math.floor(float(rows.sum()) * 50 + 0.5)
    assert ((pruned - rows * 50).abs() <= 1).all()
    assert torch.equal(pruned, apportion(rows, 50))


def test_apportion_hits_total_within_bounds():
    fr = torch.tensor([0.0, 0.26, 0.49, 1.0, 0.51])
    c = apportion(fr, 10, total=23)
    assert int(c.sum()) == 23 and (c >= 0).all() and (c <= 10).all()
    assert c[0] == 0 and c[3] == 10


def test_achieved_sparsity():
    assert achieved_sparsity(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5


@pytest.mark.parametrize("bad", [1.5, 1.0, -0.1, float("nan"), "x"])
def test_bad_sparsity_message(bad):
    with pytest.raises(ValueError, match=r"pruner\.sparsity.*\[0, 1\)"):
        keep_mask(distinct_scores(), bad)


def test_nm_that_does_not_divide_names_layer():
    with pytest.raises(ValueError, match=r"pruner\.pattern.*'3:5'.*model\.layers\.0\.mlp\.up_proj.*in_features=64"):
        keep_mask(distinct_scores(cols=64), 0.4, pattern="3:5", layer="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "2:2", "dense", "2:4:8"])
def test_malformed_pattern_lists_allowed(bad):
    with pytest.raises(ValueError, match=r"pruner\.pattern must be 'unstructured' or 'N:M'"):
        parse_pattern(bad)


def test_bad_group():
    with pytest.raises(ValueError, match="pruner.group"):
        keep_mask(distinct_scores(), 0.5, group="column")


# --- skewness allocation --------------------------------------------------------------------------
def test_row_skewness_matches_pearson_formula():
    scores = distinct_scores(out=5, cols=33, seed=3) ** 2
    sk = row_skewness(scores)
    for r in range(5):
        row = scores[r].double().tolist()
        expect = 3 * (statistics.fmean(row) - statistics.median(row)) / statistics.pstdev(row)
        assert float(sk[r]) == pytest.approx(expect, rel=1e-9)


def test_skewness_allocation_rule_and_mean():
    g = torch.Generator().manual_seed(1)
    # rows from symmetric (uniform) to heavily right-tailed (x^6): increasing skewness
    base = torch.rand(12, 256, generator=g)
    scores = torch.stack([base[i] ** (1 + i / 2) for i in range(12)])
    s = 0.5
    q = skewness_row_sparsity(scores, s)
    assert float(q.mean()) == pytest.approx(s, abs=1e-9)
    sk = row_skewness(scores)
    assert float(sk.max() - sk.min()) > 1.0
    # heavier right tail -> smaller pruning fraction: q is non-increasing in sk
    order = torch.argsort(sk)
    assert (q[order][1:] <= q[order][:-1] + 1e-12).all() and q[order][0] > q[order][-1]
    # the rule: q = clamp(1 - s + ((1 - sk) - s)/2 - alpha, 0.05, 1) with one alpha for all rows
    alpha = 1 - s + ((1 - sk) - s) / 2 - q
    free = (q > 0.05) & (q < 1)
    assert free.sum() >= 2
    assert torch.allclose(alpha[free], alpha[free][0].expand(int(free.sum())), atol=1e-9)
    assert (q >= 0.05).all()
    # and the mask applies it with the layer total exact
    mask = keep_mask(scores, q)
    assert int((~mask).sum()) == round(s * scores.numel())


@pytest.mark.parametrize("shape,k,dim", [((7, 50), 20, 1), ((7, 50), 0, 1), ((7, 50), 50, 1), ((7, 50), 123, None), ((1, 9), 4, None)])
def test_lowest_mask_is_the_stable_sort_prefix(shape, k, dim):
    """Selection in linear time (kthvalue + ties by position) picks exactly what a stable ascending sort puts
    first -- checked on scores with many ties."""
    from inferno.pruning.llm.masks import lowest_mask

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, shape, generator=g).float()  # heavy ties
    got = lowest_mask(scores, k, dim)
    if dim is None:
        ref = torch.zeros(scores.numel(), dtype=torch.bool)
        ref[torch.argsort(scores.flatten(), stable=True)[:k]] = True
        ref = ref.view(shape)
    else:
        ref = torch.zeros_like(scores, dtype=torch.bool)
        ref.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    assert torch.equal(got, ref)
