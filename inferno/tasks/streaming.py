"""Streaming tasks: a symbol stream read one step at a time (task kind ``streaming``, the temporal models' tasks).

``CharStreamTask`` (``task=shakespeare_chars``): next-character prediction on a text file (Tiny Shakespeare by
default). The characters of the whole file, sorted, are the classes (``num_classes`` must cover them). The text is
cut into three contiguous, disjoint parts by fractions of its characters (``train_range``, ``val_range``,
``test_range``: the first 80 / next 10 / last 10 % by default), and inside each part every position ``t >= window``
is an example: the ``window`` characters before ``t`` predict the character at ``t`` (windows never cross parts).
``eval_size`` keeps the first N examples of the validation and test parts (a contiguous stretch, so a step-wise
model can run through it as a stream). The training examples are views of the part's one id tensor (no copies).

``stream(split)`` gives what a step-wise model reads: the part's ids and the targets, ``targets[i] == ids[i + window]``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from inferno.errors import ConfigError, check_int
from inferno.tasks.lm import check_range, ranges_overlap
from inferno.tasks.splits import TensorSplitLoaders


class CharStreamTask(TensorSplitLoaders):
    """See the module docstring. Metric ``accuracy`` (top-1 next character) on the test part; ``val`` selects."""

    metric = "accuracy"
    has_val = True

    def __init__(self, path: str, window: int = 32, vocab_size: int = 65, train_range=(0.0, 0.8),
                 val_range=(0.8, 0.9), test_range=(0.9, 1.0), eval_size: int | None = 20000, batch_size: int = 256,
                 eval_batch_size: int = 1024, seed: int = 0, num_workers: int = 0):
        self.path = str(path)
        self.window = check_int("task.window", window, 1)
        self.vocab_size = check_int("task.num_classes", vocab_size, 2)
        self.ranges = {"train": check_range(train_range, "task.train_range"),
                       "val": check_range(val_range, "task.val_range"),
                       "test": check_range(test_range, "task.test_range")}
        for a, b in itertools.combinations(self.ranges, 2):
            if ranges_overlap(self.ranges[a], self.ranges[b]):
                raise ConfigError(f"task.{b}_range: {list(self.ranges[b])} overlaps task.{a}_range {list(self.ranges[a])}; "
                                  "the parts must be disjoint")
        self.eval_size = check_int("task.eval_size", eval_size, 1, allow_none=True)
        self.batch_size = check_int("task.batch_size", batch_size, 1)
        self.eval_batch_size = check_int("task.eval_batch_size", eval_batch_size, 1)
        self.seed, self.num_workers = seed, num_workers
        self.splits: dict[str, TensorDataset] = {}
        self.streams: dict[str, torch.Tensor] = {}
        self.chars: str = ""

    def data_files(self) -> list[Path]:
        return [Path(self.path)]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not Path(self.path).is_file():
            raise ConfigError(f"task.path: text file {self.path} not found (set INFERNO_DATA or paths.data_dir to the "
                              "shared data folder, or task.path to a text file)")
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"task.path: {self.path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "any UTF-8 text file is allowed") from e
        self.chars = "".join(sorted(set(text)))
        if len(self.chars) > self.vocab_size:
            raise ConfigError(f"task.num_classes: {self.vocab_size} classes but {self.path} has {len(self.chars)} "
                              f"distinct characters; set task.num_classes={len(self.chars)}")
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        n = len(ids)
        for split, (lo, hi) in self.ranges.items():
            part = ids[round(lo * n):round(hi * n)]
            if len(part) <= self.window:
                raise ConfigError(f"task.{split}_range: {list(self.ranges[split])} of {self.path} holds {len(part)} "
                                  f"characters, not more than task.window={self.window}")
            x, y = part[:-1].unfold(0, self.window, 1), part[self.window:]  # x[i] = part[i:i+window], y[i] = part[i+window]
            if split != "train" and self.eval_size is not None:
                x, y, part = x[:self.eval_size], y[:self.eval_size], part[:self.eval_size + self.window]
            self.splits[split] = TensorDataset(x, y)
            self.streams[split] = part

    def stream(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, targets)`` of a split: the part's character ids and its examples' targets,
        ``targets[i] == ids[i + window]`` (example ``i``'s window is ``ids[i:i + window]``)."""
        self.setup()
        return self.streams[split], self.splits[split].tensors[1]

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """``batch_size`` windows of ``window`` character ids (the offline model's input)."""
        return torch.zeros(batch_size, self.window, dtype=torch.long)
