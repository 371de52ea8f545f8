"""Zero-shot multiple choice through lm-evaluation-harness, on the in-memory (possibly pruned) model.

:class:`HarnessTask` turns a list of :class:`Item` -- a context, its choices and the index of the correct one,
rendered once with the harness' own prompt of the task (see ``commonsense.py``) -- into one harness
``multiple_choice`` task (``lm_eval.api.task.ConfigurableTask``; documents from memory through
``custom_dataset``, so nothing is downloaded) and scores it with the harness' evaluator and its HF model class
(``lm_eval.models.huggingface.HFLM`` wrapping the ``nn.Module``): the harness builds the requests
``(context, " " + choice)``, splits and scores the tokens, and computes ``acc`` (argmax of the summed
log-likelihoods) and ``acc_norm`` (argmax of the log-likelihood divided by the choice's length in characters).

Cheap per call (a grid evaluates hundreds of models): the task object is built once; documents carry the
rendered strings (the harness reads them as fields, no template is compiled per call); per call only the
``HFLM`` wrapper (no copy of the model) is made.

HFLM needs a Hugging Face tokenizer: the model folder's own, or for the tiny random test models (which use
:class:`~inferno.tasks.lm.ByteTokenizer`) :func:`byte_tokenizer`, a byte-level ``PreTrainedTokenizerFast``
whose ids are the UTF-8 bytes, identical to ``ByteTokenizer``'s.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass

from inferno.tasks.lm import ByteTokenizer

TARGET_DELIMITER = " "  # the harness' default target_delimiter (BoolQ, PIQA and ARC all use it)


@dataclass(frozen=True)
class Item:
    """One multiple-choice question as the harness scores it: each choice is the continuation
    ``TARGET_DELIMITER + choice`` of ``context``; ``gold`` indexes the correct choice."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def continuation(self, i: int) -> str:
        return TARGET_DELIMITER + self.choices[i]


def byte_unicode() -> dict[int, str]:
    """Byte value -> the printable character byte-level BPE vocabularies write it as (GPT-2's table: printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per UTF-8 byte, id = byte value (as :class:`ByteTokenizer`).

    Byte-level pre-tokenisation without merges; no special tokens (so no text is ever read as one). The pad id is
    the NUL byte, only so that the harness does not add a pad token of its own (its log-likelihood path pads
    itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.pad_token_id = 0
    return hf


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer HFLM is given for a task's tokenizer (``ByteTokenizer`` -> :func:`byte_tokenizer`)."""
    return byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer


@contextmanager
def quiet():
    """The harness' per-call warnings (model passed as an object, left truncation) off while it runs."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.cache
def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):  # the harness' HF model class without a progress bar per call
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    return QuietHFLM


def harness_lm(net, tokenizer, batch_size: int = 16):
    """``net`` wrapped in the harness' HF model class (no copy; its device and dtype as they are)."""
    # HFLM prefixes empty contexts with BOS (else EOS); a tokenizer with neither gets the NUL byte (never used here:
    # no context is empty)
    prefix = 0 if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None else None
    with quiet():
        return _hflm_class()(pretrained=net, tokenizer=tokenizer, batch_size=int(batch_size), prefix_token_id=prefix)


@dataclass
class HarnessResult:
    """The harness' ``acc`` and ``acc_norm`` over the items, and every item's per-choice log-likelihoods."""

    metrics: dict[str, float]
    logliks: list[list[float]]


class HarnessTask:
    """``items`` as one lm-evaluation-harness multiple-choice task named ``name`` (built once, reused per call)."""

    def __init__(self, name: str, items: list[Item]):
        from datasets import Dataset, DatasetDict
        from lm_eval.api.task import ConfigurableTask

        if not items:
            raise ValueError("HarnessTask: no items")
        self.name, self.items = name, list(items)
        docs = [{"query": it.context, "choices": list(it.choices), "gold": int(it.gold)} for it in self.items]
        config = {
            "task": name,
            "output_type": "multiple_choice",
            "custom_dataset": lambda **_: DatasetDict({"test": Dataset.from_list(docs)}),
            "test_split": "test",
            "doc_to_text": "query",  # document fields: the harness reads them as they are
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": TARGET_DELIMITER,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
            "metadata": {"version": 1.0},
        }
        with quiet():
            self.task = ConfigurableTask(config=config)

    def evaluate(self, net, tokenizer, batch_size: int = 16) -> HarnessResult:
        """Run the harness' evaluator on ``net`` (an HF causal LM) with ``tokenizer`` (a Hugging Face tokenizer)."""
        from lm_eval.evaluator import evaluate

        lm = harness_lm(net, tokenizer, batch_size)
        with quiet():
            out = evaluate(lm, {self.name: self.task}, bootstrap_iters=0, log_samples=True)
        samples = sorted(out["samples"][self.name], key=lambda s: s["doc_id"])
        if len(samples) != len(self.items):
            raise RuntimeError(f"harness scored {len(samples)} of {len(self.items)} items")
        logliks = [[float(ll) for ll, _greedy in s["filtered_resps"]] for s in samples]
        res = out["results"][self.name]
        return HarnessResult({"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"])}, logliks)
