"""Language-model tasks: the tokenizer, log-likelihood scoring, calibration draws, and perplexity.
Multiple choice lives in ``commonsense.py`` on the same base.

The tokenizer comes from the model folder (``AutoTokenizer``, local files only); models without one
(the tiny random test models, vocabulary 256) use :class:`ByteTokenizer`, one token per UTF-8 byte.

**Calibration never reads evaluated text, by construction.** A corpus (one text file, tokenized once:
:class:`TokenText`) is split at blank lines into parts given as fractions of its characters; a perplexity task
evaluates windows of its ``eval_range`` part and ``pruner.calibration=task`` draws only from its
``calibration_range`` part (disjoint, checked when the task is built; ``calibration_range: null`` refuses task
calibration). The generic sources (:data:`CORPORA`: ``shakespeare`` = the first 90 % of Tiny Shakespeare that the
bench LM trains on, ``wikitext2`` = the last 10 % of the WikiText-2 test text) read only their calibration part;
a source that is the task's own file is the task's calibration part. Every draw also reports the token
positions it read (:class:`Window`), so a test can compare them with the evaluated windows position by position,
and :meth:`LMTask.check_calibration` refuses an overlapping combination before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from inferno.errors import ConfigError


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255): the tokenizer of the tiny random test models."""

    vocab_size = 256
    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(path, tokenizer: bool = True) -> None:
    """Before anything loads: ``path`` is a Hugging Face model folder with a ``config.json``, safetensors weights
    (one file or an index of shards; ``.bin`` pickles are never read) and, where the task needs it, a tokenizer."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.path: {path} is not a folder (a local Hugging Face model folder is required)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: no config.json in {path} (save the model with save_pretrained)")
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        other = sorted(f.name for f in folder.glob("*.bin"))
        why = f"; {', '.join(other)} not read: weights only through safetensors" if other else ""
        raise ConfigError(f"model.path: no safetensors weights in {path}{why} (save_pretrained(safe_serialization=True))")
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path: no tokenizer files in {path} (one of {', '.join(TOKENIZER_FILES)}; save the "
                          "tokenizer beside the model)")
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):  # headers only (cheap): a damaged file fails here, in one line
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"model.path: {f} is not a readable safetensors file ({' '.join(str(e).split())}); "
                              "save the model again with save_pretrained") from e


def load_tokenizer(path: str | None):
    """The tokenizer saved in a model folder, else the byte-level fallback."""
    if path is None:
        return ByteTokenizer()
    folder = Path(path)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path: no tokenizer files in {path} (save the tokenizer beside the model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def read_text(path) -> str:
    """A plain-text file through ``datasets``' text loader, lines joined with blank lines (as the LLM
    pruning papers join WikiText-2's rows)."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise ConfigError(f"paths.data_dir: text file {path} not found (set INFERNO_DATA or paths.data_dir)")
    ds = load_dataset("text", data_files=str(path), split="train", keep_in_memory=True)
    return "\n\n".join(t for t in ds["text"] if t.strip())


@dataclass(frozen=True)
class Window:
    """Token positions ``[start, end)`` of one corpus (``corpus``: the file's resolved path and how it is read;
    for multiple-choice files the positions are example indices)."""

    corpus: str
    start: int
    end: int

    def overlaps(self, other: Window) -> bool:
        return self.corpus == other.corpus and self.start < other.end and other.start < self.end


@dataclass
class Calibration:
    """A calibration draw: the samples (a (n, seqlen) id tensor, or a list of (1, len) tensors -- one per
    example) and the corpus positions each sample read."""

    ids: torch.Tensor | list
    windows: list[Window] = field(default_factory=list)


@dataclass(frozen=True)
class Corpus:
    """A generic calibration source: a file under ``paths.data_dir`` read as a whole (``raw``) or through the
    line loader, and the fraction range of it that calibration may read."""

    parts: tuple[str, ...]
    raw: bool
    calibration_range: tuple[float, float]


CORPORA = {
    # the first 90 % (to the first blank line after it): exactly the text scripts/train_bench_lm.py trains on;
    # task=shakespeare evaluates the rest
    "shakespeare": Corpus(("tinyshakespeare", "input.txt"), raw=True, calibration_range=(0.0, 0.9)),
    # only the test split is stored: its last 10 % calibrates, task=wikitext2 evaluates the first 90 %
    "wikitext2": Corpus(("wikitext2_raw", "wiki.test.raw"), raw=False, calibration_range=(0.9, 1.0)),
}


def check_range(value, key: str) -> tuple[float, float] | None:
    """A ``[lo, hi]`` fraction range with 0 <= lo < hi <= 1 (or None), else a one-line ConfigError naming ``key``."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be [lo, hi] fractions of the text with 0 <= lo < hi <= 1, got {value!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"{key} must be [lo, hi] fractions of the text with 0 <= lo < hi <= 1, got {value!r}")
    return lo, hi


def ranges_overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def corpus_key(path, raw: bool) -> str:
    return f"{Path(path).resolve()}|{'raw' if raw else 'lines'}"


def cut_at(text: str, fraction: float) -> int:
    """Character index of the part boundary at ``fraction``: the first blank line at or after it (0 and 1 exact)."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return len(text)
    cut = int(len(text) * fraction)
    found = text.find("\n\n", cut)
    return found if found >= 0 else cut


class TokenText:
    """A text file tokenized once; ``span(range)`` maps a fraction range (cut at blank lines) to token positions.

    Raw files are read as they are (their line breaks are text); otherwise through ``datasets``' line loader,
    non-empty lines joined with blank lines (:func:`read_text`)."""

    def __init__(self, task: LMTask, path, raw: bool):
        path = Path(path)
        if raw:
            if not path.is_file():
                raise ConfigError(f"task.path: text file {path} not found")
            self.text = path.read_text()
        else:
            self.text = read_text(path)
        self.key = corpus_key(path, raw)
        self.ids, self.starts = task.encode_with_offsets(self.text)

    def token_at(self, char: int) -> int:
        """Index of the first token that starts at or after character ``char``."""
        return int(torch.searchsorted(self.starts, torch.tensor([char]), right=False)[0]) if char > 0 else 0

    def span(self, fraction_range) -> tuple[int, int]:
        lo, hi = fraction_range
        return self.token_at(cut_at(self.text, lo)), self.token_at(cut_at(self.text, hi)) if hi < 1 else len(self.ids)

    def draw(self, fraction_range, nsamples: int, seqlen: int, seed: int) -> Calibration:
        """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets, each inside ``fraction_range``
        (None: the whole text), with their positions."""
        lo, hi = self.span(fraction_range) if fraction_range is not None else (0, len(self.ids))
        starts = seeded_starts(lo, hi, nsamples, seqlen, seed)
        return Calibration(torch.stack([self.ids[a : a + seqlen] for a in starts]),
                           [Window(self.key, a, a + seqlen) for a in starts])


_TOKEN_TEXTS: dict[tuple, TokenText] = {}  # (tokenizer, corpus, mtime) -> tokenized once per process


def seeded_starts(lo: int, hi: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """``nsamples`` window starts at seeded random offsets with every window inside ``[lo, hi)``."""
    if hi - lo <= seqlen:
        raise ConfigError(f"pruner.seqlen: {seqlen} tokens do not fit in the {hi - lo} tokens of the calibration text")
    g = torch.Generator().manual_seed(int(seed))
    return (lo + torch.randint(0, hi - lo - seqlen, (int(nsamples),), generator=g)).tolist()


def model_device(net) -> torch.device:
    return next(net.parameters()).device


def max_length(net) -> int | None:
    cfg = getattr(net, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


class LMTask:
    """Shared part of the causal-LM tasks: tokenizer, scoring, the cost-model example, calibration draws."""

    kind = "causal_lm"
    has_val = False
    metric = "perplexity"
    has_examples = False  # True: calibration_unit=example can draw whole task inputs (multiple-choice tasks)

    def __init__(self, tokenizer: str | None = None, data_dir: str | None = None, cost_seqlen: int = 128, seed: int = 0):
        self.tokenizer_path, self.data_dir, self.cost_seqlen, self.seed = tokenizer, data_dir, int(cost_seqlen), seed
        self.tokenizer = None
        self._texts: dict[str, TokenText] = {}

    # ------------------------------------------------------------------ tokenizer
    def setup(self, stage=None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):
            return tok.encode(text)
        return tok(text, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []

    def encode_stream(self, text: str) -> torch.Tensor:
        """A long text as one 1-D id tensor (a leading BOS where the tokenizer adds one)."""
        return torch.tensor(self._bos() + self.encode(text), dtype=torch.long)

    def encode_with_offsets(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_stream` and the character at which every token starts (BOS: -1), tokenized once."""
        tok, bos = self.tokenizer, self._bos()
        if isinstance(tok, ByteTokenizer):
            data = text.encode("utf-8")
            ids = list(data)
            lead = torch.tensor([(b & 0xC0) != 0x80 for b in data], dtype=torch.long)  # 1 at each character start
            starts = (torch.cumsum(lead, 0) - 1).tolist()
        elif getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, starts = enc["input_ids"], [a for a, _ in enc["offset_mapping"]]
        else:  # slow tokenizers: token boundaries from the lengths of decoded prefixes
            ids = self.encode(text)
            starts = [len(tok.decode(ids[:n])) for n in range(len(ids))]
        return (torch.tensor(bos + list(ids), dtype=torch.long),
                torch.tensor([-1] * len(bos) + list(starts), dtype=torch.long))

    def token_text(self, path, raw: bool) -> TokenText:
        """A corpus file tokenized once per task (cached)."""
        LMTask.setup(self)  # the tokenizer only
        key = corpus_key(path, raw)
        if key not in self._texts:
            shared = (str(self.tokenizer_path), key, Path(path).stat().st_mtime_ns if Path(path).is_file() else 0)
            if shared not in _TOKEN_TEXTS:  # one tokenization per process (a grid builds a task per cell)
                if len(_TOKEN_TEXTS) >= 8:
                    _TOKEN_TEXTS.pop(next(iter(_TOKEN_TEXTS)))
                _TOKEN_TEXTS[shared] = TokenText(self, path, raw)
            self._texts[key] = _TOKEN_TEXTS[shared]
        return self._texts[key]

    # ------------------------------------------------------------------ calibration
    def evaluated_windows(self, net=None) -> list[Window]:
        """Corpus positions the evaluation reads (overridden by each task)."""
        raise NotImplementedError

    # Multiple-choice tasks: the calibration pool is the examples that are not evaluated, prompts only.
    def calibration_pool(self) -> list[tuple[int, str]]:
        """(index in the task's file, prompt) of every example calibration may read -- never an evaluated one."""
        if not hasattr(self, "calibration_texts"):
            raise ConfigError(f"pruner.calibration=task: task {type(self).__name__} has no unlabeled calibration inputs")
        return list(enumerate(self.calibration_texts()))

    def examples_key(self) -> str:
        return f"{self.path}|examples"

    def task_calibration(self, nsamples: int, seqlen: int, seed: int, unit: str = "window") -> Calibration:
        """Calibration from the task's own unlabeled inputs, disjoint from what it evaluates.

        ``unit="window"``: the pool's prompts joined by blank lines, ``nsamples`` windows of ``seqlen`` tokens at
        seeded offsets (a window may span several prompts); ``unit="example"``: ``nsamples`` whole prompts, one
        sample per example (drawn without replacement while the pool lasts), each a (1, len) tensor."""
        err = self.task_calibration_error(unit)
        if err:
            raise ConfigError(err)
        self.setup()
        pool = self.calibration_pool()
        if not pool:
            raise ConfigError(f"pruner.calibration=task: task {type(self).__name__} has no example left to calibrate "
                              "on (every example is evaluated); set task.limit below the number of examples")
        key = self.examples_key()
        g = torch.Generator().manual_seed(int(seed))
        if unit == "example":
            order: list[int] = []
            while len(order) < nsamples:
                order += torch.randperm(len(pool), generator=g).tolist()
            picked = [pool[i] for i in order[:nsamples]]
            return Calibration([self.encode_stream(t).view(1, -1) for _, t in picked],
                               [Window(key, idx, idx + 1) for idx, _ in picked])
        pieces, owner = [], []
        for n, (idx, text) in enumerate(pool):
            ids = self.encode(("\n\n" if n else "") + text)
            pieces += ids
            owner += [idx] * len(ids)
        stream, owner = torch.tensor(self._bos() + pieces, dtype=torch.long), [pool[0][0]] * len(self._bos()) + owner
        if stream.numel() <= seqlen:
            raise ConfigError(f"pruner.seqlen: {seqlen} tokens do not fit in the {stream.numel()} tokens of the "
                              "calibration pool; lower pruner.seqlen or use pruner.calibration_unit=example")
        starts = seeded_starts(0, stream.numel(), nsamples, seqlen, seed)
        windows = [Window(key, i, i + 1) for a in starts for i in sorted(set(owner[a : a + seqlen]))]
        return Calibration(torch.stack([stream[a : a + seqlen] for a in starts]), windows)

    def task_calibration_error(self, unit: str = "window") -> str | None:
        """Why ``pruner.calibration=task`` (with this unit) cannot be drawn, else None -- from the config alone."""
        if unit == "example" and not self.has_examples:
            return (f"pruner.calibration_unit=example: task {type(self).__name__} has no examples (a text task); "
                    "use calibration_unit=window")
        return None

    def source(self, name: str, data_dir=None) -> tuple[Path, bool, tuple[float, float] | None]:
        """A generic source's file, how it is read, and the fraction range calibration may read (None: all).
        A file that is the task's own corpus is read like it and only in its calibration part."""
        if name in CORPORA:
            c = CORPORA[name]
            root = data_dir or self.data_dir
            if not root:
                raise ConfigError(f"pruner.calibration={name} needs paths.data_dir (set INFERNO_DATA)")
            return Path(root).joinpath(*c.parts), c.raw, c.calibration_range
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"pruner.calibration: {name!r} is not one of task, random, {', '.join(CORPORA)} or a text file")
        root = data_dir or self.data_dir
        for c in CORPORA.values():
            if root and path.resolve() == Path(root).joinpath(*c.parts).resolve():
                return path, c.raw, c.calibration_range
        return path, True, None

    def source_error(self, name: str, data_dir=None) -> str | None:
        """Why calibrating on generic source ``name`` would read evaluated text, else None (from the config)."""
        return None

    def source_calibration(self, name: str, nsamples: int, seqlen: int, seed: int, data_dir=None) -> Calibration:
        """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of a generic source's calibration part."""
        path, raw, part = self.source(name, data_dir)
        return self.token_text(path, raw).draw(part, nsamples, seqlen, seed)

    def calibration_inputs(self, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        """(nsamples, seqlen) token ids of the task's own calibration text (see :meth:`task_calibration`)."""
        self.setup()
        return self.task_calibration(nsamples, seqlen, seed).ids

    # ------------------------------------------------------------------ cost model
    def cost_ids(self) -> torch.Tensor:
        """Token ids the cost model's forward is cut from (any text of the task)."""
        raise NotImplementedError

    def example_input(self, batch_size: int = 1) -> dict:
        """``{"input_ids": (batch, cost_seqlen)}``: the cost model's forward (one prefill of
        ``cost_seqlen`` tokens). A dict, so latency is measured at this batch, not the vision batch."""
        self.setup()
        ids = self.cost_ids()
        ids = ids.repeat(self.cost_seqlen // max(1, ids.numel()) + 1)[: self.cost_seqlen]
        return {"input_ids": ids.view(1, -1).expand(batch_size, -1).contiguous()}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def sequence_logprobs(self, net, seqs: list[list[int]], spans: list[tuple[int, int]], batch_size: int | None = None,
                          progress: bool = False):
        """For each token sequence, (sum of log p(token | prefix), count) over tokens ``span[0]:span[1]``.
        Sequences longer than the model's context lose tokens on the left. Batched with right padding;
        ``progress``: a bar over the batches."""
        net.eval()
        device = model_device(net)
        limit = max_length(net)
        batch_size = batch_size or getattr(self, "eval_batch_size", 16)
        items = []
        for s, (a, b) in zip(seqs, spans):
            cut = max(0, len(s) - limit) if limit else 0
            items.append((s[cut:], max(1, a - cut), b - cut))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
        for k in tqdm(range(0, len(order), batch_size), desc="score sequences", disable=not progress, leave=False):
            idx = order[k : k + batch_size]
            width = max(len(items[i][0]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                s = items[i][0]
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logits = net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for r, i in enumerate(idx):
                s, a, b = items[i]
                target = torch.tensor(s[a:b], device=device)
                lp = logp[r, a - 1 : b - 1].gather(-1, target.view(-1, 1)).sum()
                out[i] = (float(lp), b - a)
        return out



class PerplexityTask(LMTask):
    """Perplexity as the LLM-pruning papers compute it: the text (WikiText-2: its rows joined with blank lines)
    tokenized once, cut into non-overlapping windows of ``seqlen`` tokens, perplexity = exp(mean next-token NLL
    over every predicted token).

    ``eval_range``: the fraction range of the text that is evaluated (cut at blank lines); ``calibration_range``:
    the disjoint range ``pruner.calibration=task`` draws from (null: task calibration is refused).
    ``limit``: evaluate only the first ``limit`` windows of the evaluated part (a fixed subset; null = all)."""

    metric = "perplexity"

    def __init__(self, path: str | None = None, seqlen: int = 256, limit: int | None = None, batch_size: int = 32,
                 raw: bool = False, eval_range=(0.0, 1.0), calibration_range=None, **kw):
        super().__init__(**kw)
        self.path = path or (str(Path(self.data_dir) / "wikitext2_raw" / "wiki.test.raw") if self.data_dir else None)
        self.seqlen, self.limit, self.eval_batch_size, self.raw = int(seqlen), limit, int(batch_size), bool(raw)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ConfigError(f"task.limit must be a positive integer (windows) or null, got {limit!r}")
        self.eval_range = check_range(eval_range, "task.eval_range")
        if self.eval_range is None:
            raise ConfigError("task.eval_range must be [lo, hi] fractions of the text, got null")
        self.calibration_range = check_range(calibration_range, "task.calibration_range")
        if ranges_overlap(self.eval_range, self.calibration_range):
            raise ConfigError(f"task.calibration_range {list(self.calibration_range)} overlaps task.eval_range "
                              f"{list(self.eval_range)}: calibration must never read evaluated text")
        self.ids: torch.Tensor | None = None

    def setup(self, stage=None) -> None:
        super().setup()
        if self.ids is None:
            if self.path is None:
                raise ConfigError("paths.data_dir: not set; WikiText-2 needs the shared data folder (set INFERNO_DATA)")
            self.corpus = self.token_text(self.path, self.raw)
            self.eval_span = self.corpus.span(self.eval_range)
            a, b = self.eval_span
            self.ids = self.corpus.ids[a:b]  # the evaluated part
            self.text = self.corpus.text[cut_at(self.corpus.text, self.eval_range[0]):
                                         cut_at(self.corpus.text, self.eval_range[1])]

    def cost_ids(self) -> torch.Tensor:
        return self.ids

    # ------------------------------------------------------------------ calibration
    def task_calibration_error(self, unit: str = "window") -> str | None:
        if unit == "example":
            return super().task_calibration_error(unit)
        if self.calibration_range is None:
            return (f"pruner.calibration=task: task.calibration_range is null, so no text of {Path(str(self.path)).name} "
                    "is disjoint from the evaluated part; set task.calibration_range (e.g. [0.9, 1.0] with "
                    "task.eval_range=[0.0, 0.9]) or use a generic source (pruner.calibration=shakespeare)")
        return None

    def task_calibration(self, nsamples: int, seqlen: int, seed: int, unit: str = "window") -> Calibration:
        err = self.task_calibration_error(unit)
        if err:
            raise ConfigError(err)
        self.setup()
        return self.corpus.draw(self.calibration_range, nsamples, seqlen, seed)

    def source_error(self, name: str, data_dir=None) -> str | None:
        path, raw, part = self.source(name, data_dir)
        if self.path is None or corpus_key(path, raw) != corpus_key(self.path, self.raw):
            return None  # another text: no evaluated position can be read
        if part is None or ranges_overlap(part, self.eval_range):
            have = "all of it" if part is None else f"its range {list(part)}"
            return (f"pruner.calibration={name}: reads {have} of {Path(path).name}, which overlaps the evaluated "
                    f"task.eval_range {list(self.eval_range)}; use another source or move task.eval_range")
        return None

    def source_calibration(self, name, nsamples, seqlen, seed, data_dir=None) -> Calibration:
        err = self.source_error(name, data_dir)
        if err:
            raise ConfigError(err)
        return super().source_calibration(name, nsamples, seqlen, seed, data_dir)

    # ------------------------------------------------------------------ evaluation
    def windows(self, net=None) -> torch.Tensor:
        self.setup()
        seqlen = min(self.seqlen, max_length(net) or self.seqlen) if net is not None else self.seqlen
        n = self.ids.numel() // seqlen
        if self.limit is not None:
            n = min(n, int(self.limit))
        return self.ids[: n * seqlen].view(n, seqlen)

    def evaluated_windows(self, net=None) -> list[Window]:
        w = self.windows(net)
        a = self.eval_span[0]
        return [Window(self.corpus.key, a + i * w.shape[1], a + (i + 1) * w.shape[1]) for i in range(w.shape[0])]

    @torch.no_grad()
    def nll(self, net, progress: bool = False) -> tuple[float, int]:
        """Summed next-token NLL and the number of predicted tokens over the evaluated windows (``progress``: a bar
        over the batches)."""
        net.eval()
        device = model_device(net)
        total, count = 0.0, 0
        for batch in tqdm(self.windows(net).split(self.eval_batch_size), desc="perplexity", disable=not progress,
                          leave=False):
            batch = batch.to(device)
            logits = net(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
        return total, count

    def evaluate(self, net, split: str = "test", trainers=None) -> dict[str, float]:
        total, count = self.nll(net, progress=bool(getattr(trainers, "progress_bar", False)))
        return {"perplexity": math.exp(total / count), "nll": total / count, "eval_tokens": count}


WikiText2Task = PerplexityTask  # the name the configs used first
