"""The plain loop: image counting, reports and checkpoints, non-finite handling, and a ring8 smoke run."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.config_loader import load_config
from gan.data.sources import MODE_SIGMA, mode_centres
from gan.data.transforms import to_model_range, to_pixels
from gan.loop import DataSpec, NonFiniteLossError, fit, lr_factor
from gan.metrics.modes import mode_stats
from gan.rendering import generate
from gan.scoring import save_reconstruction_png


def ring_points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor(mode_centres("ring8"), dtype=torch.float32)
    idx = torch.randint(0, 8, (n,), generator=g)
    return centres[idx] + 0.01 * torch.randn(n, 2, generator=g)


def ring_batches(batch: int, n: int = 2000, scale: float = 1.5, poison: set[int] | None = None):
    """Deterministic epochs of ring8 points in the model range; `poison` batch indices carry a NaN."""
    data = ring_points(n) / scale

    def epoch(e: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + e))
        for i in range(n // batch):
            x = data[order[i * batch:(i + 1) * batch]].clone()
            if poison is not None and i in poison:
                x[0, 0] = float("nan")
            yield x, None
    return epoch


SPEC = DataSpec(shape=(2,), num_classes=0, scale=1.5, centres=mode_centres("ring8"))
SMALL = ["model.hidden=[16]", "model.z_dim=4"]


def test_counts_images_globally_and_reports_on_schedule():
    reports = []
    cfg = load_config(None, SMALL + ["train.batch_size=64", "train.kimg=1", "train.log_every_kimg=0.25",
                                     "train.checkpoint_every_kimg=0.5", "scale.num_workers=2"])
    state = fit(cfg, ring_batches(32), spec=SPEC, world_size=2,
                report=lambda m, c: reports.append((m, c is not None)))
    assert state.images == 64 * math.ceil(1000 / 64) and state.d_steps == math.ceil(1000 / 64)
    kimgs = [m["progress/kimg"] for m, _ in reports]
    assert kimgs == sorted(kimgs) and kimgs[-1] == state.kimg
    assert len(reports) == 4
    assert [c for _, c in reports] == [False, True, False, True]
    last = reports[-1][0]
    for key in ("loss/d", "loss/g", "d/real", "d/fake", "grad_norm/d", "grad_norm/g", "perf/img_per_s"):
        assert math.isfinite(last[key]), key
    assert 0 < last["d/real"] < 1 and last["perf/img_per_s"] > 0


def test_checkpoint_folder_holds_state_meta_and_samples():
    seen = []

    def report(metrics, ckpt):
        if ckpt:
            seen.append(sorted(p.name for p in Path(ckpt).iterdir()))
    fit(load_config(None, SMALL + ["train.kimg=0.2", "train.batch_size=50"]), ring_batches(50), spec=SPEC,
        report=report)
    assert seen == [["meta.json", "samples.png", "state.pt"]]


def test_an_autoencoders_grid_shows_the_first_images_over_their_reconstructions(tmp_path):
    """A plain autoencoder's decoder has no prior to sample, so its checkpoint grid is save_reconstruction_png's."""
    x = to_model_range(torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8))
    grids = []

    def report(metrics, ckpt):
        if ckpt:
            grids.append(np.asarray(Image.open(Path(ckpt) / "samples.png")))
    cfg = load_config(None, ["data.source=digits", "model.family=ae", "model.z_dim=4", "model.encoder_hidden=[16]",
                             "model.decoder_hidden=[16]", "train.batch_size=16", "train.kimg=0.064",
                             "train.sample_grid=16"])
    state = fit(cfg, lambda epoch: ((x[i:i + 16], None) for i in range(0, 64, 16)),
                spec=DataSpec(shape=(1, 8, 8)), report=report)
    save_reconstruction_png(state.D, state.G, to_pixels(x[:16]), tmp_path / "expected.png", rows=1)
    assert len(grids) == 1 and np.array_equal(grids[0], np.asarray(Image.open(tmp_path / "expected.png")))


def test_n_critic_takes_one_g_step_per_n_d_steps():
    cfg = load_config(None, SMALL + ["train.kimg=0.5", "train.batch_size=50", "loss.kind=wgan-gp",
                                     "loss.n_critic=5"])
    state = fit(cfg, ring_batches(50), spec=SPEC, report=lambda m, c: None)
    assert state.d_steps == 10 and state.g_steps == 2


def test_lazy_regularisation_regularises_every_reg_every_th_d_step(monkeypatch):
    import gan.loop

    seen, d_step = [], gan.loop.d_step

    def recording(*args, **kwargs):
        seen.append(kwargs["regularize"])
        return d_step(*args, **kwargs)
    monkeypatch.setattr(gan.loop, "d_step", recording)
    cfg = load_config(None, SMALL + ["train.kimg=0.5", "train.batch_size=50", "loss.r1_gamma=1", "loss.reg_every=4"])
    fit(cfg, ring_batches(50), spec=SPEC, report=lambda m, c: None)
    assert seen == [i % 4 == 0 for i in range(10)]


def test_a_single_non_finite_batch_is_skipped_and_counted():
    reports = []
    cfg = load_config(None, SMALL + ["train.kimg=0.5", "train.batch_size=50", "train.log_every_kimg=10"])
    state = fit(cfg, ring_batches(50, poison={3}), spec=SPEC, report=lambda m, c: reports.append(m))
    assert state.images == 500
    assert reports[-1]["train/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in state.G.parameters())


def test_non_finite_losses_in_a_row_stop_with_a_clear_error():
    cfg = load_config(None, SMALL + ["train.kimg=5", "train.batch_size=50", "train.nonfinite_patience=3"])
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*train.nonfinite_patience=3"):
        fit(cfg, ring_batches(50, poison=set(range(4, 40))), spec=SPEC, report=lambda m, c: None)


@pytest.mark.parametrize(("decay_from", "progress", "factor"), [
    (1.0, 0.0, 1.0), (1.0, 0.999, 1.0), (0.5, 0.25, 1.0), (0.5, 0.5, 1.0), (0.5, 0.75, 0.5), (0.5, 0.95, 0.1),
    (0.0, 0.0, 1.0), (0.0, 0.3, 0.7), (0.0, 1.0, 0.0)])
def test_lr_factor_is_constant_then_linear_to_zero(decay_from, progress, factor):
    optim = load_config(None, [f"optim.lr_decay_from={decay_from}"]).optim
    assert lr_factor(optim, progress) == pytest.approx(factor)


def test_learning_rates_follow_the_decay_and_are_reported():
    reports = []
    cfg = load_config(None, SMALL + ["train.kimg=1", "train.batch_size=50", "train.log_every_kimg=0.05",
                                     "optim.lr_g=1e-3", "optim.lr_d=4e-3", "optim.lr_decay_from=0.5"])
    state = fit(cfg, ring_batches(50), spec=SPEC, report=lambda m, c: reports.append(m))
    assert len(reports) == 20
    for m in reports:
        # The lr reported after a step is the one that step used: set from the images shown before it.
        expected = min(1.0, (1.0 - (m["progress/kimg"] - 0.05)) / 0.5)
        assert m["optim/lr_g"] == pytest.approx(1e-3 * expected)
        assert m["optim/lr_d"] == pytest.approx(4e-3 * expected)
    assert reports[-1]["optim/lr_g"] == pytest.approx(1e-4) and state.images == 1000


def test_empty_batch_source_is_an_error():
    with pytest.raises(ValueError, match="yielded no batch"):
        fit(load_config(None, SMALL), lambda e: iter(()), spec=SPEC, report=lambda m, c: None)


def test_ring8_smoke_fit_covers_most_modes():
    """~4,700 steps of a small MLP with R1; G_ema must put high-quality samples (within 3 sigma) on >= 6 modes."""
    cfg = load_config(None, ["model.hidden=[128,128,128]", "train.batch_size=128", "train.kimg=600",
                             "train.log_every_kimg=200", "train.checkpoint_every_kimg=1000",
                             "optim.lr_g=5e-4", "optim.lr_d=5e-4", "optim.ema_decay=0.99", "loss.r1_gamma=0.1"])
    state = fit(cfg, ring_batches(128, n=8192), spec=SPEC, report=lambda m, c: None)
    out = generate(state.G_ema, torch.randn(2500, 100, generator=torch.Generator().manual_seed(7)))
    stats = mode_stats(out.numpy() * SPEC.scale, SPEC.centres, MODE_SIGMA["ring8"])
    assert stats.modes_covered >= 6, stats
    assert stats.high_quality > 0.5, stats
    assert np.isfinite(stats.reverse_kl)


def test_reports_say_where_the_time_went_cumulatively():
    """time/steps_s grows with the steps; a report's own time shows up in the next one; checkpoints are timed."""
    reports = []

    def report(metrics, ckpt):
        reports.append(dict(metrics))
        time.sleep(0.05)
    cfg = load_config(None, SMALL + ["train.batch_size=50", "train.kimg=1", "train.log_every_kimg=0.25",
                                     "train.checkpoint_every_kimg=0.5"])
    fit(cfg, ring_batches(50), spec=SPEC, report=report)
    steps = [m["time/steps_s"] for m in reports]
    assert steps == sorted(steps) and steps[0] > 0
    assert [m["time/report_s"] for m in reports][0] == 0
    assert all(b["time/report_s"] - a["time/report_s"] >= 0.05 for a, b in zip(reports, reports[1:]))
    saved = [m["time/checkpoint_s"] for m in reports]
    assert saved[0] == 0 and saved[1] > 0 and saved[2] == saved[1] and saved[3] > saved[2], saved
