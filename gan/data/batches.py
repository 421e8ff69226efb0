"""Batches of a split held in memory: one seeded order per epoch, so a resumed run sees the batches it would have."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_seed(train_seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's order in one epoch."""
    return train_seed * 1000 + epoch * 97 + rank


def shuffled(x: np.ndarray, y: np.ndarray | None, batch_size: int, seed: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Full batches of (x, y) in a seeded random order; the remainder is dropped."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    for i in range(len(order) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx], (None if y is None else y[idx])
