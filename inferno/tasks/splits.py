"""What every task holding its splits as ``TensorDataset``s shares: seeded loaders and the one-metric evaluation.

A task using it sets ``splits`` (``train`` / ``val`` / ``test`` -> ``TensorDataset``), ``batch_size``,
``eval_batch_size``, ``seed``, ``num_workers`` and ``metric``, and a ``setup()`` that fills ``splits``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


class TensorSplitLoaders:
    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def evaluate(self, net, split: str, trainers) -> dict[str, float]:
        return {self.metric: trainers.evaluate(net, self, split)}
