"""Image-classification tasks read from local files through `datasets`.

Every task is a LightningDataModule with three splits: ``train`` (fine-tuning), ``val`` (selection) and
``test`` (reported numbers), so that no method selects on the data it is reported on.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from lightning import LightningDataModule
from torch.utils.data import TensorDataset

from inferno.errors import ConfigError, check_int
from inferno.tasks.splits import TensorSplitLoaders


class ImageClassificationTask(TensorSplitLoaders, LightningDataModule):
    """Holds the three splits as tensors; subclasses only say how to read the images and labels."""

    metric = "accuracy"
    has_val = True

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 512, seed: int = 0, num_workers: int = 0):
        super().__init__()
        check_int("task.batch_size", batch_size, 1)
        check_int("task.eval_batch_size", eval_batch_size, 1)
        check_int("task.num_workers", num_workers, 0)
        self.batch_size, self.eval_batch_size, self.seed, self.num_workers = batch_size, eval_batch_size, seed, num_workers
        self.splits: dict[str, TensorDataset] = {}

    def load(self) -> Dataset:  # -> columns "image" (float, C x H x W) and "label" (int)
        raise NotImplementedError

    def data_files(self) -> list[Path]:
        """Every file ``load`` reads: a saved search is resumed only while their content (sha256) is unchanged."""
        return []

    def split_sizes(self, n: int) -> tuple[int, int]:
        """(validation, test) sizes of the held-out part."""
        held = round(n * 0.2)
        return held // 2, held - held // 2

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ds = self.load()
        n_val, n_test = self.split_sizes(len(ds))
        parts = ds.train_test_split(test_size=n_val + n_test, seed=self.seed, shuffle=True)
        held = parts["test"].train_test_split(test_size=n_test, seed=self.seed, shuffle=True)
        for name, part in (("train", parts["train"]), ("val", held["train"]), ("test", held["test"])):
            cols = part.with_format("torch")[:]
            self.splits[name] = TensorDataset(cols["image"].float(), cols["label"].long())

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return tuple(self.splits["train"].tensors[0].shape[1:])

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.zeros(batch_size, *self.input_shape)


class DigitsTask(ImageClassificationTask):
    """scikit-learn's bundled 8x8 digits (1,797 images): needs no data directory."""

    def data_files(self) -> list[Path]:
        from importlib import resources

        return [Path(str(resources.files("sklearn.datasets.data") / "digits.csv.gz"))]  # what load_digits reads

    def load(self) -> Dataset:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
        return Dataset.from_dict({"image": images[:, None], "label": d.target.astype(np.int64)})


def idx_payload(path: Path, header: int) -> np.ndarray:
    """The bytes after the ``header`` of a gzipped idx file; a one-line ConfigError for a damaged file."""
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
        raise ConfigError(f"paths.data_dir: MNIST file {path} is not a readable gzip file ({' '.join(str(e).split())})") from e
    if len(data) < header:
        raise ConfigError(f"paths.data_dir: MNIST file {path} is too short for an idx file ({len(data)} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=header)


class MNISTTask(ImageClassificationTask):
    """The 10k MNIST test set from ``data_dir/mnist`` (idx, gzip), split 8k train / 1k val / 1k test."""

    files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

    def __init__(self, data_dir: str | None = None, train_size: int = 8000, **kw):
        super().__init__(**kw)
        self.data_dir, self.train_size = data_dir, train_size

    def split_sizes(self, n: int) -> tuple[int, int]:
        held = n - self.train_size
        return held // 2, held - held // 2

    def data_files(self) -> list[Path]:
        return [Path(self.data_dir or "") / "mnist" / f for f in self.files]

    def load(self) -> Dataset:
        paths = self.data_files()
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"paths.data_dir: MNIST file {missing[0]} not found (set INFERNO_DATA or paths.data_dir to the shared data folder)")
        raw, labels = (idx_payload(p, header) for p, header in zip(paths, (16, 8)))
        if raw.size % (28 * 28) or raw.size // (28 * 28) != labels.size:
            raise ConfigError(f"paths.data_dir: MNIST files {paths[0]} and {paths[1]} do not hold 28x28 images and one "
                              f"label each ({raw.size} pixel bytes, {labels.size} labels)")
        labels = labels.astype(np.int64)
        images = (raw.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - 0.1307) / 0.3081
        return Dataset.from_dict({"image": images, "label": labels})
