"""Every preset in configs/ builds into a valid Config, and its G and D build and run on a batch of 2 (2 packs)."""

from pathlib import Path

import pytest
import torch

from gan.config import Config
from gan.config_loader import load_config
from gan.models import build_models, realness_logit

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
REQUIRED = {"quickstart", "mnist-dcgan", "mnist-mlp", "fashion-mnist-dcgan", "cifar10-dcgan", "ring8", "grid25",
            "mnist-sgan"}
NUM_CLASSES = 10
NATIVE_CHANNELS = {"cifar10": 3}


def data_shape(cfg: Config) -> tuple[int, ...]:
    """What `prepare` stores: (2,) points, or (C, res, res) images with the source's channels unless set."""
    if cfg.data.is_points:
        return (2,)
    channels = cfg.data.channels or NATIVE_CHANNELS.get(cfg.data.source, 1)
    return (channels, cfg.data.resolution, cfg.data.resolution)


def test_all_presets_are_there():
    assert {p.stem for p in PRESETS} >= REQUIRED


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds(path):
    assert path.read_text().startswith("# "), "a preset opens with a one-line comment saying what it is"
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.train.batch_size % cfg.scale.num_workers == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_models_build_and_run(path):
    cfg = load_config(path)
    shape = data_shape(cfg)
    G, D = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=shape, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    n = 2 * cfg.model.pack  # D gives one logit per pack of samples
    y = torch.arange(n) if cfg.model.conditional else None
    with torch.no_grad():
        x = G(torch.randn(n, cfg.model.z_dim), y)
        out = D(x, y)
    assert x.shape == (n, *shape)
    assert x.abs().max() <= 1, "G ends in tanh"
    assert out.shape == ((2, NUM_CLASSES + 1) if cfg.model.semi_supervised else (2,))
    assert realness_logit(out).shape == (2,) and torch.isfinite(out).all()


def test_gpu_preset_is_sized_for_gpus():
    cfg = load_config(PRESETS[[p.stem for p in PRESETS].index("cifar10-dcgan")])
    assert data_shape(cfg) == (3, 32, 32)
    assert cfg.scale.use_gpu and 2 <= cfg.scale.num_workers <= 4
    assert min(cfg.model.g_width, cfg.model.d_width) >= 64 and cfg.model.spectral_norm
    assert cfg.loss.kind in ("hinge", "bce") and cfg.train.kimg >= 1000


def test_fashion_and_sgan_presets_read_what_they_promise():
    configs = {p.stem: load_config(p) for p in PRESETS}
    fashion, sgan = configs["fashion-mnist-dcgan"].data, configs["mnist-sgan"]
    assert fashion.source == "fashion-mnist" and fashion.root and fashion.download
    assert sgan.data == configs["mnist-dcgan"].data, "the SGAN reads the same real MNIST as mnist-dcgan"
    assert sgan.model.semi_supervised and sgan.model.labels == 100
