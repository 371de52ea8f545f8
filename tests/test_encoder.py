"""Encoders: data multiplexing's numbers (mixing rule, unit vectors, permutation equivariance, ragged batches),
structured encoder pruning (masked == physically removed logits; Taylor and Wanda-sp scores against the rule
computed here), the GLUE tasks and the one-line errors, and one CLI run on real SST-2 sentences."""

import copy

import pytest
import torch
import torch.nn.functional as F

from inferno.errors import ConfigError
from inferno.models.encoder import EncoderClassifier
from inferno.pruning.encoder.structured import (
    EncoderStructuredPruner,
    taylor_saliency,
    uniform_decisions,
    wanda_sp_saliency,
)
from inferno.pruning.llm import surgery
from inferno.tracking import read_points

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96}


def tiny(mux_n: int = 1, seed: int = 0) -> EncoderClassifier:
    torch.manual_seed(seed)
    return EncoderClassifier(num_classes=3, mux_n=mux_n, pretrained=False, config_overrides=TINY, dropout=0.0).eval()


def inputs(b: int, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, 3, length, dtype=torch.long)
    x[:, 0] = torch.randint(1000, 5000, (b, length), generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    x[:, 1] = (torch.arange(length)[None] < lengths[:, None]).long()
    x[:, 0] *= x[:, 1]
    return x


# ----------------------------------------------------------------------------------- multiplexing
def test_mux_mixes_the_mean_of_embeddings_times_unit_vectors():
    m = tiny(mux_n=4)
    v = m.mux_vectors
    assert torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-6)
    x = inputs(8)
    e = m.embed(x)  # (8, L, H)
    mixed = m.mix(e)
    expect = torch.stack([sum(e[g * 4 + i] * v[i] for i in range(4)) / 4 for g in range(2)])
    assert torch.allclose(mixed, expect, atol=1e-6)
    assert not m.mux_vectors.requires_grad and "mux_vectors" not in dict(m.named_parameters())


def test_mux_permuting_instances_with_their_vectors_and_indices_permutes_outputs():
    m = tiny(mux_n=4)
    x = inputs(4)
    out = m(x)
    perm = torch.tensor([2, 0, 3, 1])
    p = copy.deepcopy(m)
    p.mux_vectors.copy_(m.mux_vectors[perm])
    p.index_embedding.data.copy_(m.index_embedding.data[perm])
    assert (p(x[perm]) - out[perm]).abs().max() < 1e-5
    assert (m(x[perm]) - out[perm]).abs().max() > 1e-4  # without moving vectors and indices the instances differ


@pytest.mark.parametrize("b", [1, 5, 8, 11])
def test_ragged_batches_give_one_prediction_per_input(b):
    m = tiny(mux_n=4)
    x = inputs(b)
    out = m(x)
    assert out.shape == (b, 3)
    # the padding duplicates the last sentence: the first groups are computed exactly as on their own
    full = (b // 4) * 4
    if full:
        assert torch.allclose(out[:full], m(x[:full]), atol=1e-5)
    padded = torch.cat([x, x[-1:].expand((-b) % 4, -1, -1)])
    assert torch.allclose(out, m(padded)[:b], atol=1e-5)


def test_trailing_padding_is_cut_without_changing_outputs():
    m = tiny()
    x = inputs(6, length=12)
    longer = torch.cat([x, torch.zeros(6, 3, 20, dtype=torch.long)], dim=2)
    assert torch.allclose(m(x), m(longer), atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_mux_n_below_one_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"^model.mux_n: .* must be an integer >= 1"):
        EncoderClassifier(mux_n=bad, pretrained=False, config_overrides=TINY)


# ----------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("mux_n", [1, 2])
@pytest.mark.parametrize("what", ["heads", "neurons", "both"])
def test_masked_equals_removed_logits(what, mux_n):
    m = tiny(mux_n=mux_n)
    d = {0: surgery.BlockDecision(heads=[1, 3] if what != "neurons" else [],
                                  neurons=list(range(0, 96, 3)) if what != "heads" else []),
         1: surgery.BlockDecision(heads=[0, 1, 2] if what != "neurons" else [],
                                  neurons=list(range(50)) if what != "heads" else [])}
    masked, removed = copy.deepcopy(m), copy.deepcopy(m)
    surgery.apply(masked, d, "mask")
    report = surgery.apply(removed, d, "remove")
    x = inputs(6)
    assert (masked(x) - removed(x)).abs().max() < 1e-5
    assert (masked(x) - m(x)).abs().max() > 1e-4  # the pruning did change the function
    if what != "neurons":
        assert report[1]["kv_heads"] == 1 and removed.bert.encoder.layer[1].attention.self.query.out_features == 16
        assert removed.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    if what != "heads":
        assert removed.bert.encoder.layer[0].intermediate.dense.out_features == 64


def _units(block, d=16):
    s, o = block.attention.self, block.attention.output.dense
    return s, o, block.intermediate.dense, block.output.dense


def test_taylor_scores_follow_the_rule():
    m = tiny()
    x, y = inputs(10), torch.arange(10) % 3
    sal = taylor_saliency(m, x, y, batch_size=4)
    ref = copy.deepcopy(m)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()  # the whole batch at once
    blocks = ref.bert.encoder.layer
    s, o, inter, out = _units(blocks[1])
    d = 16

    def t(lin):
        return (lin.weight.grad * lin.weight).abs()

    head2 = sum(t(lin)[2 * d:3 * d].sum() for lin in (s.query, s.key, s.value)) + t(o)[:, 2 * d:3 * d].sum()
    neuron7 = t(inter)[7].sum() + t(out)[:, 7].sum()
    from inferno.pruning.encoder.structured import block_scores

    hs, ns = block_scores(m.bert.encoder.layer[1], m.config, sal, "taylor")
    assert torch.isclose(hs[2], head2.double(), rtol=1e-4)
    assert torch.isclose(ns[7], neuron7.double(), rtol=1e-4)
    dec = uniform_decisions(m, sal, "taylor", 0.5)
    assert dec[1].heads == sorted(torch.argsort(hs)[:2].tolist())
    assert dec[1].neurons == sorted(torch.argsort(ns, stable=True)[:48].tolist())


def test_wanda_sp_scores_follow_the_rule():
    m = tiny()
    x = inputs(10)
    sal = wanda_sp_saliency(m, x, batch_size=3)
    seen = {}
    block = m.bert.encoder.layer[0]
    h = block.output.dense.register_forward_hook(lambda mod, i, o: seen.update(a=i[0].detach()))
    m(x)
    h.remove()
    a = seen["a"] * x[:, 1, : seen["a"].shape[1], None]  # only attended positions count
    norms = a.reshape(-1, a.shape[-1]).norm(dim=0)
    from inferno.pruning.encoder.structured import block_scores

    _, ns = block_scores(block, m.config, sal, "wanda_sp")
    expect = block.output.dense.weight.abs().mean(0) * norms
    assert torch.allclose(ns.float(), expect, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("key, value, msg", [
    ("sparsities", [0.0], "pruner.sparsities"), ("sparsities", [1.0], "pruner.sparsities"),
    ("score", "l1", "pruner.score"), ("distill_alpha", 1.5, "pruner.distill_alpha"),
    ("distill_temperature", 0, "pruner.distill_temperature"), ("score_samples", 0, "pruner.score_samples"),
])
def test_bad_pruner_options_are_one_line(key, value, msg):
    with pytest.raises(ConfigError, match=rf"^{msg}"):
        EncoderStructuredPruner(**{key: value})


# ----------------------------------------------------------------------------------- GLUE tasks and the CLI
def test_glue_tasks_read_the_tsvs(shared_data):
    from inferno.tasks.glue import GlueTask

    t = GlueTask("rte", data_dir=shared_data, max_length=32, val_size=50, train_size=100, seed=0)
    t.setup()
    assert [len(t.splits[s]) for s in ("train", "val", "test")] == [100, 50, 277]
    x, y = t.splits["test"].tensors
    assert x.shape == (277, 3, 32) and set(y.tolist()) == {0, 1}
    assert int(x[0, 2].max()) == 1  # a sentence pair: the second segment has token type 1
    tv, tt = t.splits["val"].tensors[0], t.splits["train"].tensors[0]
    assert not any(torch.equal(a, b) for a in tv[:20] for b in tt)  # val is carved from train, disjoint


def test_glue_errors_are_one_line(tmp_path, shared_data, compose_cfg):
    from inferno.run import validate
    from inferno.tasks.glue import GlueTask

    with pytest.raises(ConfigError, match=r"^paths.data_dir: GLUE file .*train.tsv not found"):
        GlueTask("sst2", data_dir=str(tmp_path)).setup()
    (tmp_path / "glue_sst2").mkdir()
    (tmp_path / "glue_sst2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\n")
    (tmp_path / "glue_sst2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(ConfigError, match=r"^task: .* has labels \['7'\] that the sst2 head does not have"):
        GlueTask("sst2", data_dir=str(tmp_path)).setup()
    with pytest.raises(ConfigError, match=r"^task.num_classes: sst2 has 2 labels"):
        GlueTask("sst2", data_dir=shared_data, classes=3)
    with pytest.raises(ConfigError, match=r"^model.num_classes: the head has 3 classes but task sst2 has 2 labels"):
        validate(compose_cfg("model=minilm", "task=sst2", "pruner=encoder_structured", "model.num_classes=3"))
    with pytest.raises(ConfigError, match=r"^model: minilm is a encoder model and cannot run task digits"):
        validate(compose_cfg("model=minilm", "task=digits", "pruner=encoder_structured"))
    with pytest.raises(ConfigError, match=r"^pruner: encoder_structured supports encoder models, not vision"):
        validate(compose_cfg("pruner=encoder_structured"))


def test_cli_prunes_minilm_on_sst2(compose_cfg, tmp_path, shared_data):
    from inferno.run import run

    cfg = compose_cfg("model=minilm", "task=sst2", "pruner=encoder_structured", "logger=none", "model.mux_n=2",
                      "task.train_size=64", "task.val_size=32", "hardware.limit_batches=2", "train.dense_epochs=1",
                      "pruner.sparsities=[0.5]", "pruner.score_samples=16", "pruner.distill=true",
                      "hardware.progress_bar=false", "hardware.latency_repeats=1", "hardware.latency_batch_size=1", "task.throughput_batch=8")
    run(cfg, tmp_path)
    rows = read_points(tmp_path / "points.csv")
    assert [r["method"] for r in rows] == ["dense", "encoder_structured"]
    dense, pruned = ({k: _num(v) for k, v in r.items()} for r in rows)
    assert pruned["heads_removed"] == 6 * 6 and pruned["neurons_removed"] == 6 * 768  # round(0.5 * 12), round(0.5 * 1536)
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-6)  # half of every head's and neuron's parameters
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    assert pruned["mux_n"] == 2 and pruned["throughput"] > 0 and pruned["train_samples"] > dense["train_samples"]


def _num(v):
    try:
        return float(v)
    except ValueError:
        return v


def test_cli_splora_trains_only_adapters_and_prunes_them_with_the_base(compose_cfg, tmp_path, shared_data):
    from inferno.run import run

    r, h, f = 4, 384, 1536
    cfg = compose_cfg("model=minilm", "task=sst2", "pruner=splora", "logger=none", f"pruner.rank={r}",
                      "task.train_size=32", "task.val_size=32", "hardware.limit_batches=1", "train.dense_epochs=1",
                      "pruner.sparsities=[0.5]", "pruner.score_samples=8", "pruner.baseline=false",
                      "hardware.progress_bar=false", "hardware.latency_repeats=1", "hardware.latency_batch_size=1", "task.throughput_batch=4")
    run(cfg, tmp_path)
    rows = [{k: _num(v) for k, v in row.items()} for row in read_points(tmp_path / "points.csv")]
    assert [(x["method"], x["target_sparsity"]) for x in rows] == [("splora", 0.0), ("splora", 0.5)]

    def stored(d_attn, d_ffn):  # r|in| + r|out| + |out| per adapted linear of a layer, 6 layers, + the 2-class head
        per = 3 * (r * h + r * d_attn + d_attn) + (r * d_attn + r * h + h)
        per += (r * h + r * d_ffn + d_ffn) + (r * d_ffn + r * h + h)
        return 6 * per + (h * 2 + 2)

    assert rows[0]["trained_params"] == stored(h, f)
    assert rows[1]["trained_params"] == stored(h // 2, f // 2)  # the adapters lost the pruned rows / columns too
    dense = EncoderClassifier(num_classes=2)
    removed = 6 * (6 * (3 * (32 * h + 32) + 32 * h) + 768 * (2 * h + 1))  # 6 heads and 768 neurons per layer
    assert rows[1]["params"] == sum(p.numel() for p in dense.parameters()) - removed
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=1e-6)
