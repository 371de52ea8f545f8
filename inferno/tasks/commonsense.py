"""Zero-shot multiple choice in the LLM-Adapters JSON format, scored by log-likelihood of each option.

Every record has ``instruction``, ``input``, ``output`` and ``answer``. The options are written in the
instruction as ``Answer1: … Answer2: …`` (ARC), ``Solution1: …`` (PIQA), ``Option1: …`` / ``Ending1: …``
(WinoGrande, HellaSwag) -- any ``<Word><k>:`` markers -- or, when the labels are plain words such as
``true/false`` (BoolQ), the labels themselves are the options. The labels come from the
``Answer format: a/b/…`` line, so one parser (:func:`parse_example`) reads every file of the format:
``task=commonsense task.path=FILE`` needs no new code.

Scoring follows lm-evaluation-harness: the context is ``"Question: {question}\\nAnswer:"``, each
continuation ``" {option}"``; ``acc`` picks the option with the largest summed log-likelihood,
``acc_norm`` the largest log-likelihood divided by the option's length in characters (the harness'
``acc_norm``). ``task_nll`` is the mean over examples of the correct option's negative log-likelihood
per token -- on small models it moves long before accuracy does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inferno.errors import ConfigError
from inferno.tasks.lm import LMTask, Window

_FORMAT = re.compile(r"answer\s+format\s*:\s*(.+?)\s*$", re.IGNORECASE | re.DOTALL)
_INDEXED = re.compile(r"([a-z]+)(\d+)")
_QUESTION = re.compile(r"\bquestion\s*:\s*", re.IGNORECASE)
_LEADS = re.compile(
    r"^\s*please\s+(?:choose|answer|select)[^:]*?(?:question|sentence|blank)[^:]*:\s*", re.IGNORECASE
)


@dataclass
class Example:
    question: str
    options: list[str]
    label: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    def continuation(self, i: int) -> str:
        return f" {self.options[i]}"


def parse_example(record: dict) -> Example:
    """One LLM-Adapters record -> question, option texts and the index of the correct one."""
    text = str(record.get("instruction", ""))
    if record.get("input"):
        text = f"{text}\n{record['input']}"
    m = _FORMAT.search(text)
    if m is None:
        raise ValueError(f"no 'Answer format:' line in {text[:80]!r}")
    labels = [x.strip().lower() for x in m.group(1).split("/") if x.strip()]
    body = text[: m.start()].strip()
    answer = str(record.get("answer", "")).strip().lower()
    if answer not in labels:  # fall back on "the correct answer is X"
        out = str(record.get("output", "")).strip().lower().split()
        answer = out[-1] if out else answer
    if answer not in labels:
        raise ValueError(f"answer {record.get('answer')!r} is not one of the labels {labels}")
    indexed = [_INDEXED.fullmatch(x) for x in labels]
    if all(indexed) and len({x.group(1) for x in indexed}) == 1:
        word = indexed[0].group(1)
        markers = list(re.finditer(rf"(?<![A-Za-z]){word}\s*(\d+)\s*:\s*", body, re.IGNORECASE))
        found = {mk.group(1): mk for mk in markers}
        wanted = [x.group(2) for x in indexed]
        if any(k not in found for k in wanted):
            raise ValueError(f"options {labels} not all found in {body[:120]!r}")
        order = sorted(markers, key=lambda mk: mk.start())
        texts = {}
        for j, mk in enumerate(order):
            end = order[j + 1].start() if j + 1 < len(order) else len(body)
            texts[mk.group(1)] = " ".join(body[mk.end() : end].split())
        options = [texts[k] for k in wanted]
        question = body[: order[0].start()]
    else:
        options, question = labels, body
    q = _QUESTION.split(question, maxsplit=1)
    question = q[1] if len(q) == 2 else _LEADS.sub("", question)
    return Example(" ".join(question.split()), options, labels.index(answer))


def load_examples(path) -> list[Example]:
    """Every record of a JSON file (list of records) or JSON-lines file, via ``datasets``' json loader."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise ConfigError(f"task.path: file {path} not found (a JSON file in the LLM-Adapters format)")
    ds = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    return [parse_example(r) for r in ds]


class CommonsenseTask(LMTask):
    """Multiple choice from one file: ``acc`` (primary), ``acc_norm`` and ``task_nll`` on a fixed subset.

    ``limit``: evaluate a fixed random subset of that many examples (seeded by ``subset_seed``, the
    same subset in every run); the examples outside it are the pool of unlabeled task inputs that
    ``calibration_inputs`` draws from (prompts only, never answers)."""

    metric = "acc"
    has_examples = True

    def __init__(self, path: str, limit: int | None = None, subset_seed: int = 1234, batch_size: int = 16, **kw):
        super().__init__(**kw)
        self.path, self.limit, self.subset_seed, self.eval_batch_size = path, limit, subset_seed, batch_size
        self.examples: list[Example] = []
        self.pool: list[Example] = []

    def setup(self, stage=None) -> None:
        if self.examples:
            return
        super().setup()
        if self.path is None:
            raise ConfigError("task.path: a JSON file in the LLM-Adapters format is required (task.path=FILE)")
        examples = load_examples(self.path)
        if not examples:
            raise ConfigError(f"task.path: {self.path} has no examples")
        if self.limit is not None and int(self.limit) < len(examples):
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.subset_seed)).tolist()
            self.example_index = sorted(order[: int(self.limit)])
            self.pool_index = sorted(order[int(self.limit) :])
        else:  # every example is evaluated: nothing is left to calibrate on (task calibration is refused)
            self.example_index, self.pool_index = list(range(len(examples))), []
        self.examples = [examples[i] for i in self.example_index]
        self.pool = [examples[i] for i in self.pool_index]

    def calibration_texts(self) -> list[str]:
        return [e.prompt for e in self.pool]

    # ------------------------------------------------------------------ calibration vs evaluation positions
    def calibration_pool(self) -> list[tuple[int, str]]:
        """(index in the file, prompt) of every example outside the evaluated subset: prompts only."""
        self.setup()
        return [(i, e.prompt) for i, e in zip(self.pool_index, self.pool)]

    def evaluated_windows(self, net=None) -> list[Window]:
        self.setup()
        return [Window(self.examples_key(), i, i + 1) for i in self.example_index]

    def task_calibration_error(self, unit: str = "window") -> str | None:
        if self.limit is None:
            return ("pruner.calibration=task: task.limit is null, so every example is evaluated and none is left to "
                    "calibrate on; set task.limit=N (the other examples become the calibration pool) or use a "
                    "generic source")
        return super().task_calibration_error(unit)

    def cost_ids(self) -> torch.Tensor:
        self.setup()
        return self.encode_stream("\n\n".join(e.prompt for e in self.examples[:8]))

    @torch.no_grad()
    def option_logliks(self, net, examples: list[Example]) -> list[list[tuple[float, int]]]:
        """(sum of log p, number of tokens) of every option's continuation given its prompt."""
        seqs, spans = [], []
        for e in examples:
            ctx = self.encode(e.prompt)
            for i in range(len(e.options)):
                # as lm-evaluation-harness: encode the whole string, the continuation is what follows the
                # context's tokens (sentencepiece tokenizers would otherwise add a spurious leading space)
                whole = self.encode(e.prompt + e.continuation(i))
                if whole[: len(ctx)] != ctx or len(whole) <= len(ctx):  # a merge across the boundary
                    whole = ctx + self.encode(e.continuation(i))
                seqs.append(whole)
                spans.append((len(ctx), len(whole)))
        scores = self.sequence_logprobs(net, seqs, spans)
        out, k = [], 0
        for e in examples:
            out.append(scores[k : k + len(e.options)])
            k += len(e.options)
        return out

    def evaluate(self, net, split: str = "test", trainers=None) -> dict[str, float]:
        self.setup()
        results = self.option_logliks(net, self.examples)
        return score_choices(self.examples, results)


def score_choices(examples: list[Example], results: list[list[tuple[float, int]]]) -> dict[str, float]:
    """acc, acc_norm (log-likelihood / characters of the option) and task_nll (per token, correct option)."""
    acc = acc_norm = nll = 0.0
    for e, r in zip(examples, results):
        ll = [s for s, _ in r]
        norm = [s / max(1, len(e.continuation(i))) for i, (s, _) in enumerate(r)]
        acc += float(max(range(len(ll)), key=ll.__getitem__) == e.label)
        acc_norm += float(max(range(len(norm)), key=norm.__getitem__) == e.label)
        s, n = r[e.label]
        nll += -s / max(1, n)
    n = max(1, len(examples))
    return {"acc": acc / n, "acc_norm": acc_norm / n, "task_nll": nll / n, "n_examples": len(examples)}
