"""Checkpoints: plain state dicts loadable with weights_only, exact round trip, and exact resume."""

import zipfile

import pytest
import torch

from gan.checkpoint import STATE_FILE, read_checkpoint
from gan.config_loader import load_config
from gan.loop import DataSpec, build_state, fit, restore_state, save_state

from .test_loop import ring_batches

SPEC = DataSpec(shape=(2,), num_classes=0, scale=1.5)


def test_round_trip_restores_weights_optimizers_counters_and_rng(tmp_path):
    cfg = load_config(None, ["model.hidden=[16]", "model.z_dim=4"])
    state = build_state(cfg, SPEC)
    fit_cfg = load_config(None, ["model.hidden=[16]", "model.z_dim=4", "train.kimg=0.3", "train.batch_size=50"])
    trained = fit(fit_cfg, ring_batches(50), spec=SPEC, report=lambda m, c: None)
    save_state(trained, tmp_path, fit_cfg, SPEC)
    after_save = torch.rand(3)

    assert state.images == 0
    restore_state(state, tmp_path)
    assert torch.equal(torch.rand(3), after_save), "RNG state restored"
    assert state.images == trained.images == 300 and state.g_steps == trained.g_steps == 6
    for a, b in [(state.G, trained.G), (state.D, trained.D), (state.G_ema, trained.G_ema)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert state.opt_g.state_dict()["state"][0]["step"] == trained.opt_g.state_dict()["state"][0]["step"]


def test_state_file_holds_no_pickled_classes(tmp_path):
    cfg = load_config(None, ["model.hidden=[8]"])
    save_state(build_state(cfg, SPEC), tmp_path, cfg, SPEC)
    state = read_checkpoint(tmp_path)  # weights_only=True inside
    assert state["extra"]["config"]["model"]["hidden"] == [8]
    with zipfile.ZipFile(tmp_path / STATE_FILE) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    globals_used = {arg for op, arg, _ in pickle_ops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert not any("gan" in str(g) or "Config" in str(g) for g in globals_used)


def pickle_ops(data):
    import pickletools
    return pickletools.genops(data)


@pytest.mark.parametrize("decay_from", [1.0, 0.2])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, decay_from):
    over = ["model.hidden=[16]", "model.z_dim=4", "train.batch_size=50", "train.log_every_kimg=0.1",
            "train.checkpoint_every_kimg=0.25", "optim.lr_g=1e-3", f"optim.lr_decay_from={decay_from}"]
    saved = {}

    def keep(metrics, ckpt):
        if ckpt is not None:
            target = tmp_path / f"{metrics['progress/kimg']:.2f}"
            save = read_checkpoint(ckpt)
            target.mkdir()
            torch.save(save, target / STATE_FILE)
            saved[metrics["progress/kimg"]] = target

    full = fit(load_config(None, over + ["train.kimg=0.5"]), ring_batches(50, n=120), spec=SPEC, report=keep)
    assert full.epoch >= 1, "the run crosses an epoch boundary, so resume must restore the data position"
    resumed = fit(load_config(None, over + ["train.kimg=0.5"]), ring_batches(50, n=120), spec=SPEC,
                  report=lambda m, c: None, resume=saved[0.25])
    assert resumed.images == full.images == 500
    for a, b in zip(full.G.state_dict().values(), resumed.G.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.D.state_dict().values(), resumed.D.state_dict().values()):
        assert torch.equal(a, b)


def test_reports_that_draw_random_numbers_do_not_change_training():
    """In-training scores build models and sample inside the report; training must not see it."""
    over = ["model.hidden=[16]", "model.z_dim=4", "train.batch_size=50", "train.kimg=0.3",
            "train.log_every_kimg=0.1", "train.checkpoint_every_kimg=0.1"]

    def drawing(metrics, ckpt):
        torch.randn(1000)
        torch.nn.Linear(8, 8)

    quiet = fit(load_config(None, over), ring_batches(50), spec=SPEC, report=lambda m, c: None)
    noisy = fit(load_config(None, over), ring_batches(50), spec=SPEC, report=drawing)
    for a, b in zip(quiet.G.state_dict().values(), noisy.G.state_dict().values(), strict=True):
        assert torch.equal(a, b)
