"""2-D mode metrics on constructed samples with known answers."""

import math

import numpy as np
import pytest

from gan.metrics.modes import mode_stats

CENTRES = np.array([[np.cos(a), np.sin(a)] for a in np.arange(8) * 2 * np.pi / 8])


def test_perfect_samples_cover_every_mode_with_zero_kl():
    rng = np.random.default_rng(0)
    pts = np.repeat(CENTRES, 300, axis=0) + rng.normal(0, 0.01, (2400, 2))
    s = mode_stats(pts, CENTRES, 0.01)
    assert s.modes_covered == 8 and s.high_quality > 0.98
    assert s.reverse_kl == pytest.approx(0.0, abs=1e-12)
    assert s.counts == tuple(int(c) for c in np.bincount(np.repeat(np.arange(8), 300)[
        np.linalg.norm(pts - np.repeat(CENTRES, 300, axis=0), axis=1) <= 0.03], minlength=8))


def test_collapsed_samples_cover_one_mode_and_kl_is_log_m():
    pts = np.repeat(CENTRES[:1], 1000, axis=0)
    s = mode_stats(pts, CENTRES, 0.01)
    assert s.modes_covered == 1 and s.high_quality == 1.0
    assert s.reverse_kl == pytest.approx(math.log(8))


def test_far_samples_are_low_quality_and_sparse_modes_do_not_count():
    pts = np.concatenate([np.repeat(CENTRES[:4], 100, axis=0),     # 4 modes x 100
                          np.repeat(CENTRES[4:5], 5, axis=0),      # below min_count
                          np.zeros((95, 2))])                      # centre of the ring: far from all
    s = mode_stats(pts, CENTRES, 0.01, min_count=20)
    assert s.modes_covered == 4
    assert s.high_quality == pytest.approx(405 / 500)
    assert s.counts[:5] == (100, 100, 100, 100, 5)


def test_default_min_count_is_pacgans_20_of_2500_on_25_modes():
    grid = np.array([[x, y] for x in range(-4, 5, 2) for y in range(-4, 5, 2)], dtype=float)
    pts = np.concatenate([np.repeat(grid[:24], 103, axis=0), np.repeat(grid[24:], 19, axis=0)])
    pts = np.concatenate([pts, np.zeros((2500 - len(pts), 2)) + 100])
    assert mode_stats(pts, grid, 0.05).modes_covered == 24
