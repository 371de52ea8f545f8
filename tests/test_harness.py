"""Zero-shot multiple choice through lm-evaluation-harness: the harness' per-choice log-likelihoods and acc /
acc_norm against an independent forward with the prompts written out here, the installed harness' own built-in
task configs on the same documents, the project's scorer (``task.evaluator=inferno``), the byte-level HF
tokenizer, and the config keys."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferno.errors import ConfigError
from inferno.models.hf import tiny_causal_lm
from inferno.run import build
from inferno.tasks.commonsense import CommonsenseTask
from inferno.tasks.harness import byte_tokenizer, harness_lm
from inferno.tasks.lm import ByteTokenizer

FILES = {"boolq": "boolq", "piqa": "piqa", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
BUILTIN = {  # the installed harness' own task files
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
}


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", seed=0, max_positions=2048)  # room for PIQA's longest solutions in bytes


def literal(task: str, e):
    """(context, choices, gold) of a parsed example, the harness' prompts written out by hand."""
    if task == "boolq":  # "{{passage}}\nQuestion: {{question}}?\nAnswer:" without the passage; the file's ends in "?"
        assert e.question.endswith("?") and set(e.options) == {"true", "false"}
        return "Question: " + e.question + "\nAnswer:", ["no", "yes"], int(e.options[e.label] == "true")
    # piqa: "Question: {{goal}}\nAnswer:", [sol1, sol2]; arc: "Question: {{question}}\nAnswer:", choices.text
    return "Question: " + e.question + "\nAnswer:", e.options, e.label


def forward_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(continuation token | everything before it), one unpadded forward over context + continuation."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1).double()
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def argmax(xs) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def builtin_config(name: str) -> dict:
    """The harness' task config as its yaml file writes it (``include`` resolved)."""
    import lm_eval.tasks

    def load(rel: Path) -> dict:
        cfg = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / rel).read_text())
        inc = cfg.pop("include", None)
        return {**load(rel.parent / inc), **cfg} if inc else cfg

    cfg = load(Path(BUILTIN[name]))
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


def builtin_doc(name: str, e) -> dict:
    """A parsed example in the built-in task's document schema (its dataset's columns)."""
    if name == "boolq":
        return {"passage": "", "question": e.question.removesuffix("?"), "label": int(e.options[e.label] == "true")}
    if name == "piqa":
        return {"goal": e.question, "sol1": e.options[0], "sol2": e.options[1], "label": e.label}
    keys = [chr(ord("A") + i) for i in range(len(e.options))]
    return {"question": e.question, "choices": {"text": e.options, "label": keys}, "answerKey": keys[e.label]}


def run_builtin(name: str, examples, model, tokenizer) -> list[dict]:
    """The harness' built-in task ``name`` (its own templates, choices, target, delimiter) on ``examples``."""
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    cfg = builtin_config(name)
    if name == "boolq":  # the documented deviation: no passage line
        assert cfg["doc_to_text"].startswith("{{passage}}\n")
        cfg["doc_to_text"] = cfg["doc_to_text"].removeprefix("{{passage}}\n")
    docs = Dataset.from_list([builtin_doc(name, e) for e in examples])
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    cfg["custom_dataset"] = lambda **_: DatasetDict({s: docs for s in splits})
    task = ConfigurableTask(config=cfg)
    out = evaluate(harness_lm(model, tokenizer, 3), {name: task}, bootstrap_iters=0, log_samples=True)
    return sorted(out["samples"][name], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("name", list(FILES))
def test_harness_equals_a_direct_forward_the_builtin_task_and_the_project_scorer(shared_data, model, name):
    path = Path(shared_data) / "commonsense" / FILES[name] / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data folder")
    task = CommonsenseTask(path=str(path), limit=6, harness_task=name, batch_size=3)
    metrics, results = task.score(model)
    out = task.evaluate(model)
    assert len(task.examples) == len(results) == out["n_examples"] == 6

    # 1. every choice's log-likelihood and token count, from the prompt written out above (bytes: ids = UTF-8)
    ref, correct, correct_norm, nll = [], 0, 0, 0.0
    for e, res in zip(task.examples, results):
        ctx, choices, gold = literal(name, e)
        conts = [list((" " + c).encode()) for c in choices]
        lls = [forward_loglik(model, list(ctx.encode()), cont) for cont in conts]
        assert [n for _, n in res] == [len(c) for c in conts]
        assert [s for s, _ in res] == pytest.approx(lls, rel=1e-5, abs=1e-5)
        ref.append(lls)
        correct += argmax(lls) == gold
        correct_norm += argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold  # characters, no delimiter
        nll += -lls[gold] / len(conts[gold])
    assert metrics["acc"] == out["acc"] == pytest.approx(correct / 6)
    assert metrics["acc_norm"] == out["acc_norm"] == pytest.approx(correct_norm / 6)
    assert out["task_nll"] == pytest.approx(nll / 6, rel=1e-5)

    # 2. the installed harness' own task config on the same documents: the same requests and log-likelihoods
    samples = run_builtin(name, task.examples, model, task.hf_tokenizer())
    for s, item, lls in zip(samples, task.items, ref):
        assert [tuple(a) for a in s["arguments"]] == [(item.context, item.continuation(i)) for i in range(len(lls))]
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(lls, rel=1e-5, abs=1e-5)
        assert s["acc"] == float(argmax(lls) == item.gold)

    # 3. the project's scorer on the same prompts and token split
    inferno = CommonsenseTask(path=str(path), limit=6, harness_task=name, batch_size=4, evaluator="inferno")
    mine_metrics, mine = inferno.score(model)
    assert [[n for _, n in r] for r in mine] == [[n for _, n in r] for r in results]
    for r_mine, lls in zip(mine, ref):
        assert [s for s, _ in r_mine] == pytest.approx(lls, rel=1e-5, abs=1e-5)
    assert mine_metrics == pytest.approx(metrics)


def test_byte_tokenizer_has_the_byte_ids():
    hf, tok = byte_tokenizer(), ByteTokenizer()
    text = "Naïve café — 日本語, emoji 🙂, tab\tand NUL\x00 and ĀĠ <|pad|> <|endoftext|>\n"
    assert hf.encode(text) == hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert hf.vocab_size == len(hf) == 256 and hf.bos_token_id is None and hf.eos_token_id is None
    assert sorted(hf.get_vocab().values()) == list(range(256))


def test_an_hf_tokenizer_splits_and_scores_the_same_in_both_evaluators(tmp_path):
    """A BPE tokenizer from a model folder (the bench LM's kind): in the harness and in the project's scorer the
    continuation is what follows the context's tokens in the whole string's encoding, scored alike."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    recs = [{"instruction": f"Please choose the correct answer to the question: which colour is sample {i}?\n\n"
             f"Answer1: deep blue Answer2: red-ish Answer3: green {i}\n\nAnswer format: answer1/answer2/answer3",
             "input": "", "output": "", "answer": f"answer{i % 3 + 1}"} for i in range(5)]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(recs))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["instruction"] for r in recs] * 20, vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "tok")
    model = tiny_causal_lm("llama", seed=1, vocab_size=len(tok), max_positions=256)
    harness = CommonsenseTask(path=str(path), tokenizer=str(tmp_path / "tok"), batch_size=2)
    inferno = CommonsenseTask(path=str(path), tokenizer=str(tmp_path / "tok"), batch_size=2, evaluator="inferno")
    (m_h, r_h), (m_i, r_i) = harness.score(model), inferno.score(model)
    lm = harness_lm(model, harness.hf_tokenizer())
    for item, rh, ri in zip(harness.items, r_h, r_i):
        assert item.context.startswith("Question: which colour is sample")  # the ARC prompt (generic file)
        for i, ((sh, nh), (si, ni)) in enumerate(zip(rh, ri)):
            whole, ctx = tok.encode(item.context + item.continuation(i)), tok.encode(item.context)
            assert lm._encode_pair(item.context, item.continuation(i)) == (ctx, whole[len(ctx) :])
            assert nh == ni == len(whole) - len(ctx)
            ref = forward_loglik(model, ctx, whole[len(ctx) :])
            assert sh == pytest.approx(ref, rel=1e-5, abs=1e-5) and si == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert m_h == pytest.approx(m_i)


def test_answers_longer_than_the_context_fail_with_one_line(tmp_path):
    recs = [{"instruction": "Please choose the correct solution to the question: q?\n\nSolution1: " + "a" * 80 +
             "\n\nSolution2: b\n\nAnswer format: solution1/solution2", "input": "", "output": "",
             "answer": "solution2"}]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(recs))
    short = tiny_causal_lm("llama", seed=0, max_positions=32)
    with pytest.raises(ConfigError, match=r"task\.evaluator") as e:
        CommonsenseTask(path=str(path)).evaluate(short)
    assert "\n" not in str(e.value)
    assert math.isfinite(CommonsenseTask(path=str(path), evaluator="inferno").evaluate(short)["task_nll"])


def test_config_keys(compose_cfg):
    for task, prompt in (("boolq", "boolq"), ("piqa", "piqa"), ("arc_easy", "arc_easy"),
                         ("arc_challenge", "arc_challenge"), ("commonsense", None)):
        cfg = compose_cfg("model=tiny_llama", f"task={task}")
        assert cfg.task.evaluator == "harness" and cfg.task.harness_task == prompt
    for key, value, allowed in (("evaluator", "lm_eval", "harness, inferno"), ("harness_task", "hellaswag", "boolq")):
        with pytest.raises(ConfigError, match=rf"task\.{key}: '{value}' is not one of {allowed}") as e:
            build(compose_cfg("model=tiny_llama", "task=boolq", f"task.{key}={value}"), "task")
        assert "\n" not in str(e.value)
    assert build(compose_cfg("model=tiny_llama", "task=piqa", "task.evaluator=inferno"), "task").evaluator == "inferno"
