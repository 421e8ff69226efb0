"""A semi-supervised GAN's labelled pool: the few training rows that keep their label, held in memory on every
worker, and the seeded labelled batch each D step draws from it (Salimans et al. 2016)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gan.data.reader import Manifest, keep_labels, read_split
from gan.data.transforms import to_model_range

MAX_SHIFT, MAX_ZOOM = 2.0, 0.1
"""A labelled batch's augmentation (`augment`): shifts of up to 2 pixels and zooms of up to 10%, the plain classifier's
(gan.metrics.evaluator), so the SGAN and the classifier it is compared with learn from the same views of the labels."""


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
        return (shift_and_zoom(x, gen) if augment else x), self.y[index]


def shift_and_zoom(x: Tensor, gen: torch.Generator) -> Tensor:
    """(B, C, H, W) images each shifted by up to MAX_SHIFT pixels and zoomed by up to MAX_ZOOM, edge pixels repeated;
    the transforms are drawn from `gen` (on the CPU)."""
    if x.dim() != 4:
        raise ValueError(f"augmenting a labelled batch needs images (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, _ = x.shape
    u = torch.rand(b, 3, generator=gen) * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 + MAX_ZOOM * u[:, 0]
    theta[:, :, 2] = u[:, 1:] * (2 * MAX_SHIFT / h)  # grid coordinates span 2 over h pixels
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def read_labelled_pool(manifest: Manifest, *, labels: int, seed: int, rank: int = 0) -> LabelledPool:
    """The pool of a prepared dataset's training split (read whole, then all but `labels` rows dropped), for a
    worker that streams its own shard of the split and so never holds all of it."""
    x, y = read_split(manifest, "train", verify=False)
    if y is None:
        raise ValueError(f"dataset {manifest.dataset_id} has no labels: a semi-supervised GAN needs them")
    return LabelledPool.from_split(x, y, labels=labels, seed=seed, scale=manifest.scale, rank=rank)
