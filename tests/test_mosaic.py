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


# ----------------------------------------------------------------------------------- composite
def composite(apply="remove", fraction=0.5, sparsity=0.5):
    model = tiny_model("llama", seed=0, layers=3, outliers=True, outlier_count=2, outlier_factor=20.0)
    x = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    method = get_method("mosaic_composite", sparsity=sparsity, base="wanda", mosaic_m=3.0, structured_fraction=fraction,
                        apply=apply)
    return model, x, method


def block_weights(model):
    return [mod.weight for b in get_blocks(model) for mod in find_linears(b).values()]


def test_composite_structured_part_masked_equals_removed():
    model, x, m_rm = composite("remove")
    _, _, m_mask = composite("mask")
    removed, masked = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(removed, m_rm.structured, x, progress=False)
    prune_model(masked, m_mask.structured, x, progress=False)
    assert m_rm.structured.summary() == m_mask.structured.summary() and m_rm.structured.decisions
    with torch.no_grad():
        lr, lm = removed(input_ids=x).logits, masked(input_ids=x).logits
    assert (lr - lm).abs().max() < 1e-5
    # the groups' structured fractions follow the pod rule: parameter-weighted mean = sparsity x fraction
    st = m_rm.structured
    assert st.sparsity == pytest.approx(0.25)
    assert st.lam == pytest.approx(min(0.08, 0.25 / 2))
    t, n = st.group_fractions, st.group_sizes
    assert sum(n[k] * t[k] for k in t) / sum(n.values()) == pytest.approx(0.25, abs=1e-9)
    keys = sorted(t, key=lambda k: st.group_ratios[k])  # outlier-heavy groups lose fewer units
    assert all(t[a] >= t[b] - 1e-12 for a, b in itertools.pairwise(keys))


def test_composite_reaches_the_total_target():
    model, x, method = composite("remove", fraction=0.5, sparsity=0.6)
    total = sum(w.numel() for w in block_weights(model))
    net = copy.deepcopy(model)
    for stage in method.stages(net):
        prune_model(net, stage, x, progress=False)
    kept = sum(int((w != 0).sum()) for w in block_weights(net))
    assert sum(w.numel() for w in block_weights(net)) < total  # physically smaller
    assert 1 - kept / total == pytest.approx(0.6, abs=0.005)
    assert method.report()["structured"]["decisions"]


def test_composite_bad_fraction_and_family():
    with pytest.raises(ConfigError, match="pruner.structured_fraction"):
        get_method("mosaic_composite", sparsity=0.5, structured_fraction=1.5)
    t5 = torch.nn.Module()
    t5.config = type("C", (), {"model_type": "t5"})()  # a family without structured support (bert has one now)
    with pytest.raises(ConfigError, match="not 't5'"):
        get_method("mosaic_composite", sparsity=0.5).check(t5)


def test_composite_through_the_configs_exports_a_smaller_model(compose_cfg, tmp_path):
    from inferno.models.hf import load_model
    from inferno.run import run
    from inferno.tracking import read_points

    corpus = tmp_path / "corpus.raw"
    corpus.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 120)
    cfg = compose_cfg("model=tiny_llama", "model.layers=3", "task=wikitext2", f"task.path={corpus}", "task.limit=4",
                      "task.seqlen=64", "pruner=mosaic_composite", "pruner.calibration=task", "pruner.nsamples=8",
                      "pruner.seqlen=64", "pruner.base=wanda", "pruner.structured_fraction=0.5", "pruner.sparsity=0.6",
                      "save=true", "logger=none", "hardware.progress_bar=false", "hardware.latency_repeats=2")
    run(cfg, tmp_path / "run")
    dense, pruned = read_points(tmp_path / "run" / "points.csv")
    assert pruned["method"] == "mosaic_composite" and pruned["variant"] == "wanda_pod_f0.5"
    assert float(pruned["sparsity"]) == pytest.approx(0.6, abs=0.005)
    assert int(pruned["params"]) < int(dense["params"]) and float(pruned["prune_s"]) > 0
    back = load_model(str(tmp_path / "run" / "model"))
    assert sum(p.numel() for p in back.parameters()) == int(pruned["params"])
