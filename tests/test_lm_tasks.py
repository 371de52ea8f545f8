"""LM tasks: perplexity and multiple-choice scores against independent computations, the generic
LLM-Adapters parser on every shared file's format, calibration inputs."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferno.models.hf import tiny_causal_lm
from inferno.tasks.commonsense import CommonsenseTask, harness_item, load_examples, parse_example, score_choices
from inferno.tasks.harness import Item
from inferno.tasks.lm import ByteTokenizer, WikiText2Task

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" * 20


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", seed=0, max_positions=512)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.raw"
    p.write_text(TEXT)
    return p


def test_perplexity_is_exp_of_mean_token_nll(model, text_file):
    task = WikiText2Task(path=str(text_file), seqlen=48, limit=5, batch_size=2)
    out = task.evaluate(model, "test")
    # independently: the same text, joined as the task does (non-empty lines, blank-line separated), bytes
    joined = "\n\n".join(line for line in TEXT.split("\n") if line.strip())
    ids = torch.tensor(list(joined.encode()))[: 5 * 48].view(5, 48)
    nlls = []
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), -1)
            nlls += [-float(logp[t - 1, row[t]]) for t in range(1, 48)]
    assert out["eval_tokens"] == len(nlls) == 5 * 47
    assert out["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-4)
    assert task.metric == "perplexity" and task.has_val is False


def test_window_length_is_capped_at_the_models_context(text_file):
    short = tiny_causal_lm("gpt2", seed=0, max_positions=32)
    task = WikiText2Task(path=str(text_file), seqlen=256, limit=2)
    assert task.windows(short).shape == (2, 32)
    assert math.isfinite(task.evaluate(short)["perplexity"])


SHARED_FIRST = {  # first record of each shared file: (number of options, label, a piece of the correct option)
    "boolq": (2, 1, "false"),
    "piqa": (2, 0, "ripped paper strips"),
    "ARC-Easy": (4, 0, "Sunlight is the source of energy"),
    "ARC-Challenge": (4, 2, "Planetary days will become shorter."),
}


@pytest.mark.parametrize("name", list(SHARED_FIRST))
def test_parser_reads_every_shared_format(shared_data, name):
    path = Path(shared_data) / "commonsense" / name / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data folder")
    records = json.loads(path.read_text())
    n, label, piece = SHARED_FIRST[name]
    e = parse_example(records[0])
    assert len(e.options) == n and e.label == label and piece in e.options[e.label]
    assert "Answer format" not in e.question and "Answer1" not in e.question and "Solution1" not in e.question
    assert not e.question.lower().startswith("please")
    for r in records:  # every record parses, with as many options as its 'Answer format' line lists
        labels = r["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
        assert len(parse_example(r).options) == len(labels)


def test_parser_generic_markers_and_true_false():
    wino = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
            "Sarah was a much better surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah\n"
            "Option2: Maria\n\nAnswer format: option1/option2", "input": "", "output": "the correct answer is option1",
            "answer": "option1"}
    e = parse_example(wino)
    assert e.options == ["Sarah", "Maria"] and e.label == 0 and e.question.startswith("Sarah was a much")
    hs = {"instruction": "Please choose the correct ending to complete the given sentence: A man sits.\n\n"
          "Ending1: he eats. Ending2: he flies. Ending3: he runs.\n\nAnswer format: ending1/ending2/ending3",
          "input": "", "output": "the correct answer is ending3", "answer": "ending3"}
    e = parse_example(hs)
    assert e.options == ["he eats.", "he flies.", "he runs."] and e.label == 2
    tf = {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
          "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
    e = parse_example(tf)
    assert e.options == ["true", "false"] and e.label == 0 and e.question == "is the sky blue?"
    generic = harness_item(e)  # any file: the harness' ARC prompt with the parsed options
    assert generic.context == "Question: is the sky blue?\nAnswer:" and generic.continuation(1) == " false"
    assert harness_item(e, "boolq") == Item("Question: is the sky blue?\nAnswer:", ("no", "yes"), 1)


def test_acc_and_acc_norm_on_a_known_example():
    # option 0: short with the larger total log-likelihood; option 1: long, better per character
    ex = Item("q", ("ab", "abcdefghij"), gold=1)
    results = [[(-3.0, 1), (-4.0, 4)]]  # (sum log p, tokens) per option
    s = score_choices([ex], results)
    # acc: argmax(-3, -4) = 0 (wrong); acc_norm (characters of the choice, without the delimiter, as the harness):
    # -3/2 = -1.5 vs -4/10 = -0.4 -> 1 (right)
    assert s["acc"] == 0.0 and s["acc_norm"] == 1.0
    assert s["task_nll"] == pytest.approx(4.0 / 4)
    two = score_choices([ex, Item("q", ("x", "y"), 0)], results + [[(-1.0, 2), (-2.0, 1)]])
    assert two["acc"] == 0.5 and two["acc_norm"] == 1.0 and two["task_nll"] == pytest.approx((1.0 + 0.5) / 2)


def test_option_logliks_match_an_independent_forward(model, tmp_path):
    recs = [{"instruction": f"Please choose the correct answer to the question: what is {i}?\n\nAnswer1: one "
             f"Answer2: two two Answer3: three\n\nAnswer format: answer1/answer2/answer3", "input": "",
             "output": "", "answer": f"answer{i % 3 + 1}"} for i in range(5)]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(recs))
    task = CommonsenseTask(path=str(path), batch_size=4, evaluator="inferno")
    task.setup()
    got = task.option_logliks(model)
    tok = ByteTokenizer()
    for it, res in zip(task.items, got):
        for i, (s, n) in enumerate(res):
            ctx, cont = tok.encode(it.context), tok.encode(it.continuation(i))
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            ref = sum(float(logp[len(ctx) + j - 1, c]) for j, c in enumerate(cont))
            assert n == len(cont) and s == pytest.approx(ref, abs=1e-3)
    out = task.evaluate(model)
    assert set(out) >= {"acc", "acc_norm", "task_nll"} and out["n_examples"] == 5


def test_limit_is_a_fixed_subset_and_calibration_never_sees_answers(tmp_path):
    recs = [{"instruction": f"Please answer the following question with true or false, question: q{i}?\n\n"
             "Answer format: true/false", "input": "", "output": "", "answer": "true"} for i in range(30)]
    path = tmp_path / "tf.json"
    path.write_text(json.dumps(recs))
    a, b = CommonsenseTask(path=str(path), limit=10), CommonsenseTask(path=str(path), limit=10)
    a.setup(), b.setup()
    assert [e.question for e in a.examples] == [e.question for e in b.examples] and len(a.examples) == 10
    assert not {e.question for e in a.examples} & {e.question for e in a.pool}
    calib = a.calibration_inputs(4, 16, seed=0)
    assert calib.shape == (4, 16) and torch.equal(calib, a.calibration_inputs(4, 16, seed=0))
    assert not torch.equal(calib, a.calibration_inputs(4, 16, seed=1))
    stream = a.tokenizer.decode(calib.flatten().tolist())
    assert "true" not in stream.replace("true or false", "")  # prompts only, no answers


def test_shared_task_loads_with_limit(shared_data):
    path = Path(shared_data) / "commonsense" / "ARC-Easy" / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data folder")
    assert len(load_examples(path)) == 2376
    task = CommonsenseTask(path=str(path), limit=8)
    task.setup()
    assert len(task.examples) == 8 and len(task.pool) == 2376 - 8


def test_held_out_part_of_a_raw_text(tmp_path):
    """task=shakespeare: the file as is, from the first blank line after ``start`` (the training script's cut)."""
    text = "".join(f"Speaker {i}:\nline {i}\n\n" for i in range(100))
    p = tmp_path / "play.txt"
    p.write_text(text)
    task = WikiText2Task(path=str(p), raw=True, eval_range=[0.9, 1.0], calibration_range=[0.0, 0.9], seqlen=16)
    task.setup()
    cut = text.index("\n\n", int(len(text) * 0.9))
    assert task.text == text[cut:] and task.ids.tolist() == list(text[cut:].encode())
    calib = task.task_calibration(8, 16, seed=0)  # only from the training part, before the cut
    assert all(w.end <= cut for w in calib.windows)
    for row, w in zip(calib.ids, calib.windows):
        assert row.tolist() == list(text.encode())[w.start : w.end]
