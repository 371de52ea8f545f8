"""Mosaic's projection outlier distribution and allocation, recomputed in the test: r_{p,i} counted from the dense
model's own inputs, the paper's rule (weighted mean exactly s) and the public code's rule (to 1e-9, with its drift),
and each projection pruned at the sparsity allocated to it."""

import copy
import itertools
import math

import pytest
import torch

from inferno.errors import ConfigError
from inferno.models.hf import tiny_model
from inferno.pruning.llm.methods import get_method
from inferno.pruning.llm.runner import find_linears, get_blocks, prune_model

torch.set_num_threads(1)


def setup(allocation="pod", base="wanda", m=3.0, lam=0.08, sparsity=0.5):
    model = tiny_model("llama", seed=0, layers=3, outliers=True, outlier_count=2, outlier_factor=20.0)
    x = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    method = get_method("mosaic", sparsity=sparsity, base=base, mosaic_m=m, mosaic_lambda=lam, allocation=allocation)
    pruned = copy.deepcopy(model)
    prune_model(pruned, method, x, progress=False)
    return model, pruned, x, method


def dense_ratios(model, x, m):
    """r_{p,i} and r_i from hooks on the dense model: |W| * ||X_k||_2 over every calibration token."""
    seen = {}
    handles = [mod.register_forward_pre_hook(lambda mod, a, key=(i, n): seen.setdefault(key, []).append(a[0]))
               for i, b in enumerate(get_blocks(model)) for n, mod in find_linears(b).items()]
    with torch.no_grad():
        model(input_ids=x)
    for h in handles:
        h.remove()
    ratios, block, sizes = {}, {}, {}
    for i, b in enumerate(get_blocks(model)):
        every = []
        for n, mod in find_linears(b).items():
            inp = torch.cat(seen[(i, n)]).reshape(-1, mod.in_features).double()
            s = mod.weight.detach().double().abs() * inp.pow(2).sum(0).sqrt()
            ratios[(i, n)] = float((s > m * s.mean()).double().mean())
            sizes[(i, n)] = s.numel()
            every.append(s.flatten())
        allv = torch.cat(every)
        block[i] = float((allv > m * allv.mean()).double().mean())
    return ratios, block, sizes


def test_pod_ratios_and_paper_allocation():
    model, pruned, x, method = setup("pod")
    ratios, block, sizes = dense_ratios(model, x, 3.0)
    assert method.ratios.keys() == ratios.keys()
    for k in ratios:
        assert method.ratios[k] == pytest.approx(ratios[k], abs=1e-9), k
    for i in block:
        assert method.block_ratios[i] == pytest.approx(block[i], abs=1e-9)
    s = method.per_projection
    weighted = sum(sizes[k] * s[k] for k in s) / sum(sizes.values())
    assert weighted == pytest.approx(0.5, abs=1e-6) and method.drift == pytest.approx(0.0, abs=1e-9)
    keys = sorted(s, key=lambda k: ratios[k])  # more outliers -> less pruning
    assert all(s[a] >= s[b] - 1e-12 for a, b in itertools.pairwise(keys))
    assert max(s.values()) - min(s.values()) == pytest.approx(2 * 0.08, abs=1e-9)
    # every projection lost the fraction allocated to it (Wanda rounds per row: round(cols x s) / cols, half up)
    for i, b in enumerate(get_blocks(pruned)):
        for n, mod in find_linears(b).items():
            cols = mod.in_features
            assert float((mod.weight == 0).double().mean()) == pytest.approx(math.floor(cols * s[(i, n)] + 0.5) / cols, abs=1e-12)


def test_reference_allocation_reproduces_the_public_code():
    model, _, x, method = setup("reference")
    ratios, block, sizes = dense_ratios(model, x, 3.0)
    lam, sp = 0.08, 0.5

    def scaled(v):
        v = torch.tensor(v, dtype=torch.float64)
        return (v - v.min()) / (v.max() - v.min()) * 2 * lam if v.max() > v.min() else torch.zeros_like(v)

    c = scaled([block[i] for i in range(3)])
    for n in {n for _, n in ratios}:
        cp = scaled([ratios[(i, n)] for i in range(3)])
        for i in range(3):
            expect = sp - float(c[i]) + float(cp.mean())
            assert method.per_projection[(i, n)] == pytest.approx(expect if expect > 0 else 0.01, abs=1e-9)
    weighted = sum(sizes[k] * method.per_projection[k] for k in sizes) / sum(sizes.values())
    assert method.drift == pytest.approx(weighted - sp, abs=1e-12)


def test_sparsegpt_base_reaches_each_allocation():
    _, pruned, _, method = setup("pod", base="sparsegpt")
    for i, b in enumerate(get_blocks(pruned)):
        for n, mod in find_linears(b).items():  # SparseGPT's layer-wise mask: the allocated fraction of the matrix
            assert float((mod.weight == 0).double().mean()) == pytest.approx(method.per_projection[(i, n)], abs=2e-3)


@pytest.mark.parametrize("kw, key", [({"mosaic_m": 0}, "pruner.mosaic_m"), ({"mosaic_lambda": -0.1}, "pruner.mosaic_lambda"),
                                     ({"mosaic_lambda": 0.3}, "pruner.mosaic_lambda"), ({"allocation": "owl"}, "pruner.allocation"),
                                     ({"base": "magnitude"}, "pruner.base")])
def test_bad_options(kw, key):
    with pytest.raises(ConfigError, match=key):
        get_method("mosaic", sparsity=0.5, **kw)
