"""Zero-shot multiple choice in the LLM-Adapters JSON format, scored through lm-evaluation-harness.

**Data.** Every record has ``instruction``, ``input``, ``output`` and ``answer``. The options are written in the
instruction as ``Answer1: … Answer2: …`` (ARC), ``Solution1: …`` (PIQA), ``Option1: …`` / ``Ending1: …``
(WinoGrande, HellaSwag) -- any ``<Word><k>:`` markers -- or, when the labels are plain words such as
``true/false`` (BoolQ), the labels themselves are the options. The labels come from the
``Answer format: a/b/…`` line, so one parser (:func:`parse_example`) reads every file of the format:
``task=commonsense task.path=FILE`` needs no new code.

**Prompts** are the harness' own built-in zero-shot tasks' (``task.harness_task``), mirrored in
:func:`harness_item` and checked against the installed harness' task files by ``tests/test_harness.py``:

* ``piqa`` (``lm_eval/tasks/piqa``): ``"Question: {goal}\nAnswer:"``, choices ``[sol1, sol2]``;
* ``arc_easy`` / ``arc_challenge`` (``lm_eval/tasks/arc``): ``"Question: {question}\nAnswer:"``, choices the
  answer texts; ``null`` (any other file): the same ARC prompt with the parsed options;
* ``boolq`` (``lm_eval/tasks/super_glue/boolq``): ``"{passage}\nQuestion: {question}?\nAnswer:"``, choices
  ``["no", "yes"]``. **Deviation:** the shared BoolQ file has questions only, no passages, so the passage line is
  left out: ``"Question: {question}?\nAnswer:"`` (the file's questions end with "?", which the harness' template
  adds itself, so it is not doubled). Numbers are therefore not comparable to published BoolQ results.

Each choice is scored as the continuation ``" " + choice`` (the harness' target delimiter) of the context.

**Metrics.** ``acc`` (primary): the choice with the largest summed log-likelihood; ``acc_norm``: the largest
log-likelihood divided by the choice's length in characters, delimiter excluded (the harness' ``acc_norm``);
``task_nll``: the mean over examples of the correct choice's negative log-likelihood per token (tokens as the
harness splits context and continuation) -- on small models it moves long before accuracy does;
``n_examples``.

**Evaluator** (``task.evaluator``): ``harness`` (default) runs lm-evaluation-harness on the in-memory model
(:mod:`inferno.tasks.harness`); ``inferno`` is the project's own scorer (:meth:`CommonsenseTask.option_logliks`)
on the same contexts, choices and token split -- the same log-likelihoods up to float rounding, except where
context + continuation exceed the model's context length (the harness keeps the last ``max_length + 1`` tokens,
the project's scorer the last ``max_length``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inferno.errors import ConfigError
from inferno.tasks.harness import HarnessTask, Item, hf_tokenizer
from inferno.tasks.lm import LMTask, Window, max_length

EVALUATORS = ("harness", "inferno")
HARNESS_TASKS = ("boolq", "piqa", "arc_easy", "arc_challenge")  # task.harness_task; null: the ARC prompt

_FORMAT = re.compile(r"answer\s+format\s*:\s*(.+?)\s*$", re.IGNORECASE | re.DOTALL)
_INDEXED = re.compile(r"([a-z]+)(\d+)")
_QUESTION = re.compile(r"\bquestion\s*:\s*", re.IGNORECASE)
_LEADS = re.compile(
    r"^\s*please\s+(?:choose|answer|select)[^:]*?(?:question|sentence|blank)[^:]*:\s*", re.IGNORECASE
)


@dataclass
class Example:
    """One parsed record: the question, the option texts and the index of the correct one."""

    question: str
    options: list[str]
    label: int


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


def check_json(path) -> None:
    """A one-line ConfigError unless ``path`` is a JSON list of records or JSON lines of records (checked here:
    the ``datasets`` loader reports a damaged file in a multi-line traceback, after a progress bar)."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"task.path: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        for i, line in enumerate(text.splitlines(), 1):  # JSON lines: one record per line
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"task.path: {path} is neither JSON nor JSON lines ({whole.msg} at line {whole.lineno} "
                                  f"column {whole.colno}); a list of records in the LLM-Adapters format is allowed") from None
            if not isinstance(record, dict):
                raise ConfigError(f"task.path: {path} line {i} is not a record (a JSON object)")
        return
    if not isinstance(data, dict) and not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
        raise ConfigError(f"task.path: {path} holds a JSON {type(data).__name__}; a list of records (JSON objects) "
                          "in the LLM-Adapters format is allowed")


def load_examples(path) -> list[Example]:
    """Every record of a JSON file (list of records) or JSON-lines file, via ``datasets``' json loader."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise ConfigError(f"task.path: file {path} not found (a JSON file in the LLM-Adapters format)")
    check_json(path)
    ds = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    return [parse_example(r) for r in ds]


def harness_item(e: Example, harness_task: str | None = None) -> Item:
    """The example as the harness' built-in task ``harness_task`` prompts and scores it (None: the ARC prompt)."""
    if harness_task == "boolq":
        # super_glue/boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"], label 1 = yes -- without
        # the passage, which the shared file does not have
        words = [o.lower() for o in e.options]
        if set(words) not in ({"true", "false"}, {"yes", "no"}):
            raise ConfigError(f"task.harness_task=boolq needs true/false (or yes/no) answers, got options {e.options}")
        gold = int(words[e.label] in ("true", "yes"))
        return Item(f"Question: {e.question.removesuffix('?')}?\nAnswer:", ("no", "yes"), gold)
    if harness_task == "piqa" and len(e.options) != 2:
        raise ConfigError(f"task.harness_task=piqa needs two solutions per example, got {len(e.options)}: {e.options}")
    # piqa: "Question: {{goal}}\nAnswer:", [sol1, sol2], label; arc: "Question: {{question}}\nAnswer:",
    # choices.text, the index of answerKey
    return Item(f"Question: {e.question}\nAnswer:", tuple(e.options), e.label)


class CommonsenseTask(LMTask):
    """Multiple choice from one file: ``acc`` (primary), ``acc_norm``, ``task_nll`` and ``n_examples`` on a fixed
    subset, scored by ``evaluator`` (``harness`` | ``inferno``) with the prompt of the harness task ``harness_task``.

    ``limit``: evaluate a fixed random subset of that many examples (seeded by ``subset_seed``, the
    same subset in every run); the examples outside it are the pool of unlabeled task inputs that
    calibration draws from (prompts only, never answers)."""

    metric = "acc"
    has_examples = True

    def __init__(self, path: str, limit: int | None = None, subset_seed: int = 1234, batch_size: int = 16,
                 evaluator: str = "harness", harness_task: str | None = None, **kw):
        if evaluator not in EVALUATORS:
            raise ConfigError(f"task.evaluator: {evaluator!r} is not one of {', '.join(EVALUATORS)}")
        if harness_task is not None and harness_task not in HARNESS_TASKS:
            raise ConfigError(f"task.harness_task: {harness_task!r} is not one of {', '.join(HARNESS_TASKS)} or null "
                              "(the ARC prompt)")
        super().__init__(**kw)
        self.path, self.limit, self.subset_seed, self.eval_batch_size = path, limit, subset_seed, batch_size
        self.evaluator, self.harness_task = evaluator, harness_task
        self.examples: list[Example] = []
        self.pool: list[Example] = []
        self.items: list[Item] = []  # the evaluated examples as the harness prompts them
        self._requests: list[list[tuple[list[int], list[int]]]] | None = None
        self._harness: HarnessTask | None = None
        self._hf_tokenizer = None

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
        self.items = [harness_item(e, self.harness_task) for e in self.examples]

    def prompt(self, e: Example) -> str:
        """An example's context, as the evaluation prompts it (an unlabeled task input)."""
        return harness_item(e, self.harness_task).context

    def calibration_texts(self) -> list[str]:
        return [self.prompt(e) for e in self.pool]

    # ------------------------------------------------------------------ calibration vs evaluation positions
    def calibration_pool(self) -> list[tuple[int, str]]:
        """(index in the file, prompt) of every example outside the evaluated subset: prompts only."""
        self.setup()
        return [(i, self.prompt(e)) for i, e in zip(self.pool_index, self.pool)]

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
        return self.encode_stream("\n\n".join(it.context for it in self.items[:8]))

    # ------------------------------------------------------------------ scoring
    def hf_tokenizer(self):
        """The Hugging Face form of the task's tokenizer, for the harness' model class (built once)."""
        self.setup()
        if self._hf_tokenizer is None:
            self._hf_tokenizer = hf_tokenizer(self.tokenizer)
        return self._hf_tokenizer

    def request_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split as the harness' HF model class splits them: trailing spaces of
        the context move to the continuation, the whole string is encoded (with the tokenizer's own special
        tokens, e.g. a BOS where it adds one) and the continuation is what follows the context's tokens."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        # ByteTokenizer.encode: the bytes; an HF tokenizer's encode adds its special tokens, as HFLM's does
        ctx, whole = self.tokenizer.encode(context), self.tokenizer.encode(context + continuation)
        return ctx, whole[len(ctx) :]

    def requests(self) -> list[list[tuple[list[int], list[int]]]]:
        """Per evaluated item, the (context, continuation) token ids of every choice (tokenized once)."""
        self.setup()
        if self._requests is None:
            self._requests = [[self.request_ids(it.context, it.continuation(i)) for i in range(len(it.choices))]
                              for it in self.items]
        return self._requests

    @torch.no_grad()
    def option_logliks(self, net, progress: bool = False) -> list[list[tuple[float, int]]]:
        """The project's scorer: per evaluated item, (sum of log p, number of tokens) of every choice's continuation
        given its context (batched, right-padded, one forward per sequence; ``progress``: a bar over batches)."""
        reqs = self.requests()
        seqs = [ctx + cont for r in reqs for ctx, cont in r]
        spans = [(len(ctx), len(ctx) + len(cont)) for r in reqs for ctx, cont in r]
        scores = self.sequence_logprobs(net, seqs, spans, progress=progress)
        out, k = [], 0
        for r in reqs:
            out.append(scores[k : k + len(r)])
            k += len(r)
        return out

    def harness(self) -> HarnessTask:
        """The evaluated items as one lm-evaluation-harness task (built once)."""
        self.setup()
        if self._harness is None:
            self._harness = HarnessTask(self.harness_task or "commonsense", self.items)
        return self._harness

    def score(self, net, progress: bool = False) -> tuple[dict[str, float], list[list[tuple[float, int]]]]:
        """``acc`` / ``acc_norm`` and, per evaluated item, (log-likelihood, tokens) of every choice -- from the
        configured evaluator (token counts: the continuation's tokens in the harness' split)."""
        self.setup()
        if self.evaluator == "inferno":
            results = self.option_logliks(net, progress)
            scores = score_choices(self.items, results)
            return {"acc": scores["acc"], "acc_norm": scores["acc_norm"]}, results
        limit = max_length(net)
        long = sum(len(cont) > limit for r in self.requests() for _ctx, cont in r) if limit else 0
        if long:  # the harness asserts on these; say which key to change instead
            raise ConfigError(f"task.evaluator=harness: {long} answer(s) in the evaluated examples of {self.path} are "
                              f"longer than the model's {limit}-token context, which lm-evaluation-harness cannot "
                              "score; use task.evaluator=inferno (keeps the last tokens) or a longer-context model")
        out = self.harness().evaluate(net, self.hf_tokenizer(), self.eval_batch_size)
        results = [[(ll, len(cont)) for ll, (_ctx, cont) in zip(lls, r)] for lls, r in zip(out.logliks, self.requests())]
        return out.metrics, results

    def evaluate(self, net, split: str = "test", trainers=None) -> dict[str, float]:
        metrics, results = self.score(net, progress=bool(getattr(trainers, "progress_bar", False)))
        return {**metrics, "task_nll": task_nll(self.items, results), "n_examples": len(self.items)}


def task_nll(items: list[Item], results: list[list[tuple[float, int]]]) -> float:
    """Mean over items of the correct choice's negative log-likelihood per token."""
    return sum(-r[it.gold][0] / max(1, r[it.gold][1]) for it, r in zip(items, results)) / max(1, len(items))


def score_choices(items: list[Item], results: list[list[tuple[float, int]]]) -> dict[str, float]:
    """The project's scoring of per-choice (log-likelihood, tokens): ``acc`` (argmax of the log-likelihoods),
    ``acc_norm`` (argmax of log-likelihood / characters of the choice, delimiter excluded, as the harness; the first
    on ties, as numpy's argmax), ``task_nll`` and ``n_examples``."""
    acc = acc_norm = 0.0
    for it, r in zip(items, results):
        ll = [s for s, _ in r]
        norm = [s / max(1, len(c)) for s, c in zip(ll, it.choices)]
        acc += float(max(range(len(ll)), key=ll.__getitem__) == it.gold)
        acc_norm += float(max(range(len(norm)), key=norm.__getitem__) == it.gold)
    n = max(1, len(items))
    return {"acc": acc / n, "acc_norm": acc_norm / n, "task_nll": task_nll(items, results), "n_examples": len(items)}
