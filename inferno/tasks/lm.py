"""Language-model tasks: the tokenizer, log-likelihood scoring, calibration windows, and WikiText-2
perplexity. Multiple choice lives in ``commonsense.py`` on the same base.

The tokenizer comes from the model folder (``AutoTokenizer``, local files only); models without one
(the tiny random test models, vocabulary 256) use :class:`ByteTokenizer`, one token per UTF-8 byte.

Every LM task exposes ``calibration_inputs(nsamples, seqlen, seed)``: ``nsamples`` windows of
``seqlen`` token ids drawn at random offsets from the task's own unlabeled text (for
``pruner.calibration=task``); :meth:`LMTask.text_windows` does the same for any other text
(``pruner.calibration=shakespeare|wikitext2|FILE``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

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


def load_tokenizer(path: str | None):
    """The tokenizer saved in a model folder, else the byte-level fallback."""
    if path is None:
        return ByteTokenizer()
    folder = Path(path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
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


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets of a 1-D id stream (seeded)."""
    if ids.numel() <= seqlen:
        reps = seqlen // max(1, ids.numel()) + 2
        ids = ids.repeat(reps)
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (int(nsamples),), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def model_device(net) -> torch.device:
    return next(net.parameters()).device


def max_length(net) -> int | None:
    cfg = getattr(net, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


class LMTask:
    """Shared part of the causal-LM tasks: tokenizer, scoring, the cost-model example, calibration."""

    kind = "causal_lm"
    has_val = False
    metric = "perplexity"

    def __init__(self, tokenizer: str | None = None, data_dir: str | None = None, cost_seqlen: int = 128, seed: int = 0):
        self.tokenizer_path, self.data_dir, self.cost_seqlen, self.seed = tokenizer, data_dir, int(cost_seqlen), seed
        self.tokenizer = None
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ tokenizer
    def setup(self, stage=None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):
            return tok.encode(text)
        return tok(text, add_special_tokens=False)["input_ids"]

    def encode_stream(self, text: str) -> torch.Tensor:
        """A long text as one 1-D id tensor (a leading BOS where the tokenizer adds one)."""
        ids = self.encode(text)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = [bos] + ids
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------ calibration
    def calibration_texts(self) -> list[str]:
        """The task's unlabeled inputs (overridden by each task)."""
        raise NotImplementedError

    def calibration_ids(self) -> torch.Tensor:
        if "task" not in self._text_cache:
            self._text_cache["task"] = self.encode_stream("\n\n".join(self.calibration_texts()))
        return self._text_cache["task"]

    def calibration_inputs(self, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        """(nsamples, seqlen) token ids from the task's own unlabeled inputs, at seeded random offsets."""
        self.setup()
        return random_windows(self.calibration_ids(), nsamples, seqlen, seed)

    def calibration_prompts(self, nsamples: int, seed: int = 0) -> list[torch.Tensor]:
        """``nsamples`` whole task inputs (prompts) as (1, len) id tensors, drawn at random (seeded)."""
        self.setup()
        texts = self.calibration_texts()
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(0, len(texts), (int(nsamples),), generator=g).tolist()
        return [self.encode_stream(texts[i]).view(1, -1) for i in idx]

    def text_windows(self, path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        """Like :meth:`calibration_inputs` but from any text file (generic calibration)."""
        self.setup()
        key = str(path)
        if key not in self._text_cache:
            self._text_cache[key] = self.encode_stream(read_text(path))
        return random_windows(self._text_cache[key], nsamples, seqlen, seed)

    # ------------------------------------------------------------------ cost model
    def example_input(self, batch_size: int = 1) -> dict:
        """``{"input_ids": (batch, cost_seqlen)}``: the cost model's forward (one prefill of
        ``cost_seqlen`` tokens). A dict, so latency is measured at this batch, not the vision batch."""
        self.setup()
        ids = self.calibration_ids()
        ids = ids.repeat(self.cost_seqlen // max(1, ids.numel()) + 1)[: self.cost_seqlen]
        return {"input_ids": ids.view(1, -1).expand(batch_size, -1).contiguous()}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def sequence_logprobs(self, net, seqs: list[list[int]], spans: list[tuple[int, int]], batch_size: int | None = None):
        """For each token sequence, (sum of log p(token | prefix), count) over tokens ``span[0]:span[1]``.
        Sequences longer than the model's context lose tokens on the left. Batched with right padding."""
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
        for k in range(0, len(order), batch_size):
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


class WikiText2Task(LMTask):
    """Perplexity on the WikiText-2 raw test text, in non-overlapping windows of ``seqlen`` tokens
    (the LLM-pruning papers' protocol: rows joined by blank lines, tokenized once, cut into windows;
    perplexity = exp(mean next-token NLL over every predicted token)).

    ``limit``: evaluate only the first ``limit`` windows (a fixed subset; null = the whole text)."""

    metric = "perplexity"

    def __init__(self, path: str | None = None, seqlen: int = 256, limit: int | None = None, batch_size: int = 32,
                 start: float = 0.0, raw: bool = False, **kw):
        super().__init__(**kw)
        self.path = path or (str(Path(self.data_dir) / "wikitext2_raw" / "wiki.test.raw") if self.data_dir else None)
        self.seqlen, self.limit, self.eval_batch_size = int(seqlen), limit, int(batch_size)
        self.start, self.raw = float(start), bool(raw)
        self.ids: torch.Tensor | None = None

    def setup(self, stage=None) -> None:
        super().setup()
        if self.ids is None:
            if self.path is None:
                raise ConfigError("paths.data_dir: not set; WikiText-2 needs the shared data folder (set INFERNO_DATA)")
            if self.raw:  # the file as is (e.g. Tiny Shakespeare, whose line breaks are part of the text)
                if not Path(self.path).is_file():
                    raise ConfigError(f"task.path: text file {self.path} not found")
                text = Path(self.path).read_text()
            else:
                text = read_text(self.path)
            if self.start:  # evaluate from this fraction of the text on, cut at the next blank line
                cut = int(len(text) * self.start)
                cut = text.index("\n\n", cut) if "\n\n" in text[cut:] else cut
                text = text[cut:]
            self.text = text
            self.ids = self.encode_stream(self.text)

    def calibration_texts(self) -> list[str]:
        self.setup()
        return [self.text]

    def calibration_ids(self) -> torch.Tensor:
        self.setup()
        return self.ids

    def windows(self, net=None) -> torch.Tensor:
        self.setup()
        seqlen = min(self.seqlen, max_length(net) or self.seqlen) if net is not None else self.seqlen
        n = self.ids.numel() // seqlen
        if self.limit is not None:
            n = min(n, int(self.limit))
        return self.ids[: n * seqlen].view(n, seqlen)

    @torch.no_grad()
    def nll(self, net) -> tuple[float, int]:
        """Summed next-token NLL and the number of predicted tokens over the evaluated windows."""
        net.eval()
        device = model_device(net)
        total, count = 0.0, 0
        for batch in self.windows(net).split(self.eval_batch_size):
            batch = batch.to(device)
            logits = net(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
        return total, count

    def evaluate(self, net, split: str = "test", trainers=None) -> dict[str, float]:
        total, count = self.nll(net)
        return {"perplexity": math.exp(total / count), "nll": total / count, "eval_tokens": count}
