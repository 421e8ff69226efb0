"""Shared test helpers: the path of ../shared/data and small deterministic batch sources."""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin while waiting slow torch 30-200x when another process holds the other core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_IDX = REPO.parent / "shared" / "data" / "mnist-t10k"


@pytest.fixture
def mnist_idx() -> Path:
    """The real MNIST test set in IDX format from ../shared/data; skips when that folder is absent."""
    if not (MNIST_IDX / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_IDX} (../shared/data is not beside the repo)")
    return MNIST_IDX
