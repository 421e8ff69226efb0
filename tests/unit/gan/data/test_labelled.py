"""The labelled pool of a semi-supervised GAN: exactly keep_labels' subset (the plain classifier's), and seeded,
rank-aware, resumable labelled batches drawn only from it."""

import numpy as np
import pytest
import torch

from gan.config import DataConfig
from gan.data import keep_labels, prepare, read_split, to_model_range
from gan.data.labelled import LabelledPool, labelled_subset, read_labelled_pool
from gan.data.reader import load_manifest, shard_paths


def toy_split(n: int = 300, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose every pixel is the row index mod 256 (so a drawn image names its row), and labels."""
    rng = np.random.default_rng(seed)
    x = (np.arange(n) % 256).astype(np.uint8).reshape(n, 1, 1, 1).repeat(4, axis=2).repeat(4, axis=3)
    return x, rng.integers(0, classes, n)


def test_the_pool_is_exactly_keep_labels_subset_in_split_order():
    x, y = toy_split()
    masked = keep_labels(y, 40, seed=3)
    rows = np.flatnonzero(masked >= 0)
    x_kept, y_kept = labelled_subset(x, y, 40, seed=3)
    assert len(rows) == 40 and np.array_equal(x_kept, x[rows]) and np.array_equal(y_kept, y[rows])
    pool = LabelledPool.from_split(x, y, labels=40, seed=3)
    assert torch.equal(pool.x, to_model_range(x[rows])) and torch.equal(pool.y, torch.from_numpy(y[rows]))
    other = labelled_subset(x, y, 40, seed=4)[0]
    assert not np.array_equal(other, x_kept), "the train seed picks the rows"


def test_batches_hold_only_pool_rows_with_their_labels_and_cover_the_pool():
    x, y = toy_split(200)
    pool = LabelledPool.from_split(x, y, labels=20, seed=0)
    kept = {int(r): int(label) for r, label in zip(labelled_subset(x[:, 0, 0, 0], y, 20, 0)[0], pool.y)}
    seen = set()
    for step in range(10):
        xb, yb = pool.batch(step, 8)
        rows = [round((float(v) + 1) * 127.5) for v in xb[:, 0, 0, 0]]
        assert len(set(rows)) == 8, "no row repeats within a batch smaller than the pool"
        assert all(kept[r] == int(label) for r, label in zip(rows, yb)), "every drawn row is kept, with its label"
        seen.update(rows)
    assert seen == set(kept)
    xb, yb = pool.batch(0, 50)  # larger than the pool: whole permutations, each row 2 or 3 times
    counts = np.bincount([round((float(v) + 1) * 127.5) for v in xb[:, 0, 0, 0]], minlength=256)[sorted(kept)]
    assert counts.sum() == 50 and counts.min() == 2 and counts.max() == 3


def test_draws_depend_only_on_seed_rank_and_step():
    x, y = toy_split()
    pool = LabelledPool.from_split(x, y, labels=100, seed=0)
    again = LabelledPool.from_split(x, y, labels=100, seed=0)
    assert torch.equal(pool.batch(7, 16)[0], again.batch(7, 16)[0]), "a resumed run draws the same at step 7"
    assert not torch.equal(pool.batch(7, 16)[0], pool.batch(8, 16)[0])
    rank1 = LabelledPool.from_split(x, y, labels=100, seed=0, rank=1)
    assert not torch.equal(pool.batch(7, 16)[0], rank1.batch(7, 16)[0]), "data-parallel ranks draw different rows"


def test_a_pool_refuses_unlabelled_rows_and_too_many_labels():
    with pytest.raises(ValueError, match="only labelled rows"):
        LabelledPool(torch.zeros(3, 2), torch.tensor([0, -1, 1]), seed=0)
    x, y = toy_split(30)
    with pytest.raises(ValueError, match="cannot keep 31 labels"):
        labelled_subset(x, y, 31, 0)


def test_a_worker_reads_the_pool_of_a_prepared_split_shard_by_shard(tmp_path):
    manifest = load_manifest(prepare(DataConfig(source="digits", resolution=8, shard_rows=200), tmp_path))
    assert len(shard_paths(manifest, "train")) > 3, "the kept rows come from several shards"
    x, y = read_split(manifest, "train")
    pool = read_labelled_pool(manifest, labels=30, seed=2, rank=1)
    x_kept, y_kept = labelled_subset(x, y, 30, 2)
    assert torch.equal(pool.x, to_model_range(x_kept)) and torch.equal(pool.y, torch.from_numpy(y_kept))
    assert pool.rank == 1 and pool.seed == 2


def test_reading_chosen_rows_returns_exactly_them(tmp_path):
    digits = load_manifest(prepare(DataConfig(source="digits", resolution=8, shard_rows=200), tmp_path))
    x_all, y_all = read_split(digits, "train")
    x, y = read_split(digits, "train", keep=lambda labels: labels == 3)
    assert len(y) > 0 and np.array_equal(x, x_all[y_all == 3]) and np.array_equal(y, y_all[y_all == 3])
