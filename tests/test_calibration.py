"""Calibration never reads evaluated text (every task x every source, token positions compared), and the
INFERNO options of issue 9: the per-row bound of the skewness allocation, the reference code's row limit, the
one-pass (dense) statistics, whole-example calibration."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferno.errors import ConfigError
from inferno.models.hf import tiny_causal_lm
from inferno.pruning.llm.methods import InfernoTask, Wanda
from inferno.pruning.llm.runner import find_linears, get_blocks, prune_model
from inferno.pruning.llm.scores import skewness_row_sparsity
from inferno.run import build

TASKS = ["wikitext2", "shakespeare", "boolq", "piqa", "arc_easy", "arc_challenge"]
SOURCES = ["task", "shakespeare", "wikitext2", "random", "FILE:tinyshakespeare/input.txt", "FILE:wikitext2_raw/wiki.test.raw"]
# what the default configs must allow (the thesis_llm grid uses them); every other pair either draws or is refused
MUST_DRAW = {(t, s) for t in TASKS for s in ("task", "shakespeare", "random")} | {("wikitext2", "wikitext2")}


def _source(shared, s):
    return f"{shared}/{s[5:]}" if s.startswith("FILE:") else s


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("unit", ["window", "example"])
def test_no_calibration_window_overlaps_an_evaluated_window(compose_cfg, shared_data, task_name, unit):
    """For every task x source (x unit), the token positions calibration reads and the positions evaluation
    reads (the whole evaluated part, no limit) are disjoint; refused pairs are refused by ``check`` with one line."""
    drawn = 0
    for s in SOURCES:
        source = _source(shared_data, s)
        overrides = ["model=tiny_llama", f"task={task_name}", "pruner=wanda", f"pruner.calibration={source}",
                     "pruner.nsamples=16", "pruner.seqlen=64", f"pruner.calibration_unit={unit}"]
        if task_name not in ("wikitext2", "shakespeare"):
            overrides.append("task.limit=200")
        cfg = compose_cfg(*overrides)
        try:
            pruner = build(cfg, "pruner")
            task = build(cfg, "task")
            pruner.check(task)
        except ConfigError as e:
            assert "\n" not in str(e)
            assert unit == "example" or (task_name, s) not in MUST_DRAW, str(e)
            continue
        task.setup()
        calib = pruner.draw(tiny_causal_lm("llama", max_positions=512), task)
        evaluated = task.evaluated_windows()
        assert evaluated and (s == "random" or calib.windows)
        by_corpus = {}
        for w in evaluated:
            by_corpus.setdefault(w.corpus, []).append(w)
        for c in calib.windows:
            assert not any(c.overlaps(w) for w in by_corpus.get(c.corpus, [])), (task_name, s, c)
        drawn += 1
    text_task = task_name in ("wikitext2", "shakespeare")
    # whole examples exist only on multiple-choice tasks, and only from the task itself
    assert drawn == (0 if text_task else 1) if unit == "example" else drawn >= 4


def _draw(compose_cfg, max_positions, *overrides):
    """The task and the calibration the configured pruner draws for it (a tiny Llama of that context)."""
    cfg = compose_cfg("model=tiny_llama", *overrides)
    pruner, task = build(cfg, "pruner"), build(cfg, "task")
    task.setup()
    return task, pruner.draw(tiny_causal_lm("llama", max_positions=max_positions), task)


def test_window_positions_are_what_calibration_reads(compose_cfg, shared_data):
    """The reported positions are the drawn tokens: the generic source re-read independently from the file."""
    _task, calib = _draw(compose_cfg, 512, "task=wikitext2", "pruner=wanda", "pruner.calibration=shakespeare",
                         "pruner.nsamples=8", "pruner.seqlen=32")
    text = Path(shared_data, "tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    cut = text.index("\n\n", int(len(text) * 0.9))  # scripts/train_bench_lm.py trains on text[:cut]
    data = list(text.encode())
    for row, w in zip(calib.ids, calib.windows):
        assert w.end <= len(text[:cut].encode()) and row.tolist() == data[w.start : w.end]


def test_overlapping_configs_are_refused_before_the_model_loads(compose_cfg, shared_data):
    papers = ("task=wikitext2", "task.eval_range=[0,1]", "task.calibration_range=null")  # the whole test text
    for source in ("task", "wikitext2", f"{shared_data}/wikitext2_raw/wiki.test.raw"):
        cfg = compose_cfg("model=tiny_llama", *papers, "pruner=wanda", f"pruner.calibration={source}")
        with pytest.raises(ConfigError, match=r"calibration") as e:
            build(cfg, "pruner").check(build(cfg, "task"))
        assert "\n" not in str(e.value)
    build(compose_cfg("model=tiny_llama", *papers, "pruner=wanda", "pruner.calibration=shakespeare"), "pruner")
    with pytest.raises(ConfigError, match=r"task\.calibration_range"):
        build(compose_cfg("model=tiny_llama", "task=wikitext2", "task.calibration_range=[0.5,1]"), "task")
    with pytest.raises(ConfigError, match=r"task\.eval_range"):
        build(compose_cfg("model=tiny_llama", "task=wikitext2", "task.eval_range=[0.9,0.1]"), "task")
    with pytest.raises(ConfigError, match=r"limit"):  # every example evaluated: no pool left
        cfg = compose_cfg("model=tiny_llama", "task=boolq", "pruner=inferno_task")
        build(cfg, "pruner").check(build(cfg, "task"))


@pytest.mark.parametrize("overrides, key", [
    (("pruner=wanda", "pruner.calibration_unit=sentence"), "pruner.calibration_unit"),
    (("pruner=wanda", "pruner.calibration_unit=example"), "pruner.calibration_unit"),  # generic source
    (("pruner=wanda", "pruner.sequential=maybe"), "pruner.sequential"),
    (("pruner=inferno_task", "pruner.max_row_sparsity=0.3"), "pruner.max_row_sparsity"),  # below the target 0.5
    (("pruner=inferno_task", "pruner.max_row_sparsity=1.5"), "pruner.max_row_sparsity"),
    (("pruner=inferno_task", "pruner.row_limit=0"), "pruner.row_limit"),
    (("pruner=inferno_task", "pruner.score=l2", "pruner.row_limit=4"), "pruner.row_limit"),
])
def test_new_options_fail_with_one_line_naming_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        build(compose_cfg("model=tiny_llama", "task=wikitext2", *overrides), "pruner")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- skewness row bound
def _skewed_scores(seed=0):
    """The issue's reproduction: 64 half-normal rows (right-skewed) + 4 near-symmetric rows."""
    g = torch.Generator().manual_seed(seed)
    skewed = torch.randn(64, 256, generator=g).abs()
    symmetric = 10 + 0.01 * torch.rand(4, 256, generator=g)
    return torch.cat([skewed, symmetric])


def test_unbounded_skewness_empties_a_row_and_the_default_bound_does_not():
    scores = _skewed_scores()
    assert float(skewness_row_sparsity(scores, 0.7).max()) == 1.0  # the formula clamped at 1 alone
    w = scores.clone()
    for cap, most in ((None, 255), (1.0, 256), (0.8, 204)):
        m = InfernoTask(0.7, score="skewness", max_row_sparsity=cap)
        pruned = m.prune_weight(w, _Norms(256), 0, "x")
        zeros = (pruned == 0).sum(dim=1)
        assert int(zeros.max()) <= most
        assert int(zeros.sum()) == round(0.7 * w.numel())  # the mean is still exact
    assert int(((InfernoTask(0.7, score="skewness").prune_weight(w, _Norms(256)) == 0).sum(1) == 256).sum()) == 0
    assert int(((InfernoTask(0.7, score="skewness", max_row_sparsity=1.0).prune_weight(w, _Norms(256)) == 0)
                .sum(1) == 256).sum()) >= 1


class _Norms:
    """Input norms of one: the scores are |W|."""

    def __init__(self, n):
        self.norms = torch.ones(n)


def test_row_limit_prunes_only_the_first_rows_at_their_own_rates():
    scores = _skewed_scores(1)
    full = InfernoTask(0.5, score="skewness").prune_weight(scores, _Norms(256))
    limited = InfernoTask(0.5, score="skewness", row_limit=24).prune_weight(scores, _Norms(256))
    assert torch.equal(limited[24:], scores[24:])  # the reference's loop never reaches these rows
    rates = skewness_row_sparsity(scores, 0.5, cap=255 / 256)
    assert abs(int((limited == 0).sum()) - float(rates[:24].sum()) * 256) <= 1
    assert int((limited == 0).sum()) < int((full == 0).sum()) == 0.5 * scores.numel()


# ----------------------------------------------------------------------------------- dense one-pass statistics
def test_sequential_false_takes_every_statistic_from_the_dense_model():
    """sequential=false == Wanda's rule applied with input norms recorded on ONE forward of the dense model."""
    dense = tiny_causal_lm("llama", seed=3)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    sq = {}
    hooks = []
    for i, block in enumerate(get_blocks(dense)):
        for name, mod in find_linears(block).items():
            def hook(mod, args, key=f"{i}.{name}"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        dense(input_ids=ids)
    for h in hooks:
        h.remove()
    expect = {}
    for i, block in enumerate(get_blocks(dense)):
        for name, mod in find_linears(block).items():
            s = mod.weight.detach().abs() * sq[f"{i}.{name}"].sqrt().float().view(1, -1)
            k = int(0.5 * s.shape[1])
            drop = torch.argsort(s, dim=1, stable=True)[:, :k]
            expect[f"{i}.{name}"] = mod.weight.detach().clone().scatter_(1, drop, 0.0)
    one_pass, seq = tiny_causal_lm("llama", seed=3), tiny_causal_lm("llama", seed=3)
    prune_model(one_pass, Wanda(0.5), ids, batch_size=2, progress=False, sequential=False)
    prune_model(seq, Wanda(0.5), ids, batch_size=2, progress=False, sequential=True)
    differs = False
    for i, (a, b) in enumerate(zip(get_blocks(one_pass), get_blocks(seq))):
        for name, mod in find_linears(a).items():
            assert torch.equal((mod.weight == 0), (expect[f"{i}.{name}"] == 0)), (i, name)
            differs |= not torch.equal(mod.weight, find_linears(b)[name].weight)
    assert differs  # the default (pruned inputs) is a different rule after the first block


# ----------------------------------------------------------------------------------- whole-example calibration
def test_example_unit_is_one_whole_prompt_per_sample(compose_cfg, shared_data):
    task, calib = _draw(compose_cfg, 2048, "task=arc_easy", "task.limit=200", "pruner=inferno_task",
                        "pruner.calibration_unit=example", "pruner.nsamples=12")
    pool = dict(task.calibration_pool())
    assert len(calib.ids) == 12 and len({w.start for w in calib.windows}) == 12  # 12 distinct examples
    for x, w in zip(calib.ids, calib.windows):
        assert x.shape[0] == 1 and x[0].tolist() == task.encode(pool[w.start])  # the whole prompt, no answer
    evaluated = {w.start for w in task.evaluated_windows()}
    assert len(evaluated) == 200 and not evaluated & {w.start for w in calib.windows}


def test_every_thesis_llm_cell_composes_and_passes_the_checks(compose_cfg, shared_data):
    """Every cell of the thesis_llm grid (and experiment=inferno_thesis) builds its pruner and task and passes
    the calibration checks from the config alone -- the grid never fails half-way on a refused pair."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("grid", Path(__file__).parents[1] / "experiments/thesis_llm/run.py")
    grid_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_run)
    grid = compose_cfg("experiment=thesis_llm").thesis_llm_grid
    args = SimpleNamespace(models=["bench_lm"], tasks=None, seeds=[0], settings=None, methods=None, limit=None)
    cells = list(grid_run.cells(grid, args))
    # per multiple-choice task 26 (method, setting) pairs at one seed; the perplexity tasks lack inferno_thesis x 2
    assert len(cells) == 4 * 26 + 2 * 24
    seen = set()
    for rel, over in cells:  # the checks depend on the task and the method, not on the setting or the seed
        if (rel.parts[1], rel.parts[3]) in seen:
            continue
        seen.add((rel.parts[1], rel.parts[3]))
        cfg = compose_cfg("experiment=thesis_llm", *over, "logger=none")
        build(cfg, "pruner").check(build(cfg, "task"))
    assert len(seen) == 4 * 9 + 2 * 8  # 9 methods; inferno_thesis only on the multiple-choice tasks
    cfg = compose_cfg("experiment=inferno_thesis")
    pruner = build(cfg, "pruner")
    assert (pruner.unit, pruner.generate, pruner.sequential, pruner.method.score) == ("example", 50, False, "skewness")
    pruner.check(build(cfg, "task"))
