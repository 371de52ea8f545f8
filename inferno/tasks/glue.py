"""GLUE sequence classification (SST-2, RTE) from the local TSVs, read through ``datasets``' csv loader.

Splits: ``train`` is a seeded subsample of GLUE's train split (``train_size``, so a CPU budget fits); ``val``
(selection) is carved from the rest of GLUE train, disjoint from ``train``; ``test`` is GLUE's dev split (the
reported accuracy, as GLUE test labels are not public). Sentences (or sentence pairs) are tokenized once with the
model's tokenizer, padded / truncated to ``max_length``; each example is one (3, max_length) tensor: ids,
attention mask, token types (what ``models.encoder`` reads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from inferno.errors import ConfigError
from inferno.tasks.vision import ImageClassificationTask

GLUE = {  # name -> folder, text columns, label names (their index is the class)
    "sst2": ("glue_sst2", ("sentence",), ("0", "1")),
    "rte": ("glue_rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
}


class GlueTask(ImageClassificationTask):
    """One GLUE task: ``dataset`` in ``GLUE``; ``tokenizer`` a folder (null: the MiniLM's)."""

    def __init__(self, dataset: str, data_dir: str | None = None, tokenizer: str | None = None, max_length: int = 64,
                 train_size: int | None = None, val_size: int = 500, classes: int | None = None,
                 throughput_batch: int = 64, **kw):
        super().__init__(**kw)
        name = dataset
        if name not in GLUE:
            raise ConfigError(f"task.dataset: {name!r} is not a GLUE task of the project; choose from {', '.join(GLUE)}")
        if not isinstance(max_length, int) or max_length < 8:
            raise ConfigError(f"task.max_length: {max_length!r} must be an integer >= 8")
        for key, value in (("task.train_size", train_size), ("task.val_size", val_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key}: {value!r} must be a positive integer (train_size may be null: all)")
        if not isinstance(throughput_batch, int) or throughput_batch < 1:
            raise ConfigError(f"task.throughput_batch: {throughput_batch!r} must be a positive integer")
        self.name, self.data_dir, self.tokenizer_path = name, data_dir, tokenizer
        self.max_length, self.train_size, self.val_size = max_length, train_size, val_size
        self.folder, self.columns, self.labels = GLUE[name]
        if classes is not None and classes != len(self.labels):
            raise ConfigError(f"task.num_classes: {name} has {len(self.labels)} labels ({', '.join(self.labels)}), "
                              f"not {classes}")
        self.num_classes = len(self.labels)
        self.throughput_batch = throughput_batch

    def data_files(self) -> list[Path]:
        return [Path(self.data_dir or "") / self.folder / f"{s}.tsv" for s in ("train", "dev")]

    def check_files(self) -> None:
        missing = [str(p) for p in self.data_files() if not p.is_file()]
        if missing:
            raise ConfigError(f"paths.data_dir: GLUE file {missing[0]} not found (set INFERNO_DATA or paths.data_dir "
                              "to the shared data folder)")

    def _read(self, path: Path):
        from datasets import load_dataset

        ds = load_dataset("csv", data_files=str(path), delimiter="\t", quoting=3, split="train",
                          keep_default_na=False)
        need = [*self.columns, "label"]
        absent = [c for c in need if c not in ds.column_names]
        if absent:
            raise ConfigError(f"task: {path} has no column {absent[0]!r} (columns: {', '.join(ds.column_names)})")
        bad = sorted({str(v).strip() for v in ds["label"]} - set(self.labels))
        if bad:
            raise ConfigError(f"task: {path} has labels {bad[:5]} that the {self.name} head does not have "
                              f"(allowed: {', '.join(self.labels)})")
        return ds

    def tokenizer(self):
        from transformers import AutoTokenizer

        from inferno.models.encoder import minilm_path

        return AutoTokenizer.from_pretrained(minilm_path(self.tokenizer_path))

    def _tensors(self, ds, tok) -> TensorDataset:
        texts = [[str(t) for t in ds[c]] for c in self.columns]
        enc = tok(*texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt",
                  return_token_type_ids=True)
        x = torch.stack([enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]], dim=1).long()
        y = torch.tensor([self.labels.index(str(v).strip()) for v in ds["label"]], dtype=torch.long)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.check_files()
        train_path, dev_path = self.data_files()
        train = self._read(train_path).shuffle(seed=self.seed)
        n_val = min(self.val_size, len(train) // 5)
        n_train = len(train) - n_val if self.train_size is None else min(self.train_size, len(train) - n_val)
        tok = self.tokenizer()
        self.splits["val"] = self._tensors(train.select(range(n_val)), tok)
        self.splits["train"] = self._tensors(train.select(range(n_val, n_val + n_train)), tok)
        self.splits["test"] = self._tensors(self._read(dev_path), tok)

    @property
    def seq_len(self) -> int:
        return self.max_length

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """The cost model's input: the first training sentence padded to ``max_length`` with every position
        attended (a full-length sequence: MACs, latency and throughput at the fixed length), ``batch_size`` copies."""
        self.setup()
        x = self.splits["train"].tensors[0][:1].clone()
        x[:, 1] = 1
        return x.expand(batch_size, *x.shape[1:]).contiguous()
