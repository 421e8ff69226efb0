"""A semi-supervised GAN's labelled pool: the few training rows that keep their label, held in memory on every
worker, and the seeded labelled batch each D step draws from it (Salimans et al. 2016)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gan.data.reader import Manifest, keep_labels, read_split
from gan.data.transforms import shift_and_zoom, to_model_range


def labelled_subset(x: np.ndarray, y: np.ndarray, labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `labels` rows of a training split that keep their label, `keep_labels(y, labels, seed)`, in split order:
    the same rows training draws from and the evaluation's plain classifier learns from."""
    masked = keep_labels(y, labels, seed)
    keep = masked >= 0
    return x[keep], masked[keep]


class LabelledPool:
    """Labelled examples (x in the model range, y) and a batch of them for any D step.

    `batch(step, size)` depends only on (seed, rank, step): a resumed run draws what the uninterrupted one would
    have, and data-parallel ranks draw different rows. Within a batch no row repeats until all have been drawn."""

    def __init__(self, x: Tensor, y: Tensor, *, seed: int, rank: int = 0):
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"a labelled pool needs as many labels as examples, at least one: {len(x)} x, {len(y)} y")
        if bool((y < 0).any()):
            raise ValueError("a labelled pool holds only labelled rows (y >= 0)")
        self.x, self.y, self.seed, self.rank = x, y.long(), seed, rank

    @classmethod
    def from_split(cls, x: np.ndarray, y: np.ndarray, *, labels: int, seed: int, scale: float = 1.0,
                   rank: int = 0) -> LabelledPool:
        """The pool of `labelled_subset(x, y, labels, seed)` for stored values `x` (uint8 pixels or points); the
        train seed that chose the rows also seeds the draws."""
        x_kept, y_kept = labelled_subset(x, y, labels, seed)
        return cls(to_model_range(x_kept, scale), torch.from_numpy(y_kept), seed=seed, rank=rank)

    def to(self, device: torch.device | str) -> LabelledPool:
        return LabelledPool(self.x.to(device), self.y.to(device), seed=self.seed, rank=self.rank)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, step: int, size: int, *, augment: bool = False) -> tuple[Tensor, Tensor]:
        """`size` labelled examples for D step `step`: whole seeded permutations of the pool, concatenated; with
        `augment` (images only), each randomly shifted and zoomed (seeded alike)."""
        seed = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        rounds = -(-size // len(self))
        index = torch.cat([torch.randperm(len(self), generator=gen) for _ in range(rounds)])[:size]
        index = index.to(self.y.device)
        x = self.x[index]
        # The plain classifier's augmentation (gan.metrics.evaluator), so the SGAN and the classifier it is compared
        # with learn from the same views of the labels.
        return (shift_and_zoom(x, gen) if augment else x), self.y[index]


def read_labelled_pool(manifest: Manifest, *, labels: int, seed: int, rank: int = 0) -> LabelledPool:
    """The pool of a prepared dataset's training split, for a worker that streams its own shard of the split and so
    never holds all of it: the labels are read first, then only the kept rows' images, shard by shard."""
    if not manifest.labelled:
        raise ValueError(f"dataset {manifest.dataset_id} has no labels: a semi-supervised GAN needs them")
    x, y = read_split(manifest, "train", verify=False, keep=lambda y_all: keep_labels(y_all, labels, seed) >= 0)
    return LabelledPool(to_model_range(x, manifest.scale), torch.from_numpy(y), seed=seed, rank=rank)
