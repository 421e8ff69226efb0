"""Every preset in configs/ builds into a valid Config, and its G and D (an autoencoder's decoder and encoder) build
and run on a batch of 2 (2 packs)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gan.autoencoding import encode
from gan.config import AUTOENCODER_FAMILIES, Config
from gan.config_loader import load_config
from gan.models import build_models, realness_logit
from pipelines.model_registry import model_name

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
REQUIRED = {"quickstart", "mnist-dcgan", "mnist-mlp", "fashion-mnist-dcgan", "cifar10-dcgan", "ring8", "grid25",
            "mnist-sgan", "mnist-ae", "mnist-vae"}
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
    assert x.abs().max() <= 1, "G ends in tanh (a decoder in 2 sigmoid - 1)"
    if cfg.model.family in AUTOENCODER_FAMILIES:
        assert encode(D, x).shape == (n, cfg.model.z_dim)
        return
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


def test_autoencoder_presets_are_the_reference_and_sized_for_cpus():
    configs = {p.stem: load_config(p) for p in PRESETS}
    ae, vae = configs["mnist-ae"], configs["mnist-vae"]
    assert ae.data == vae.data == configs["mnist-dcgan"].data, "both read the same real MNIST as mnist-dcgan"
    decoder, encoder = build_models(ae.model, loss_kind=ae.loss.kind, data_shape=(1, 28, 28), num_classes=10)
    # 784 -> 32 -> 128 and 128 -> 784, weights and biases.
    assert sum(p.numel() for p in encoder.parameters()) == 784 * 32 + 32 + 32 * 128 + 128
    assert sum(p.numel() for p in decoder.parameters()) == 128 * 784 + 784
    assert ae.model.likelihood == "bernoulli" and ae.train.batch_size == 256
    assert (ae.optim.lr_g, ae.optim.lr_d, ae.optim.beta1, ae.optim.beta2) == (1e-3, 1e-3, 0.9, 0.999), "Keras' Adam"
    train_images = 8000  # the 10k test set, test_fraction 0.2
    assert round(ae.train.kimg * 1000 / train_images) == 50, "50 epochs"
    decoder, encoder = build_models(vae.model, loss_kind=vae.loss.kind, data_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in [*encoder.parameters(), *decoder.parameters()]) < 1_000_000


def test_conditional_mnist_preset_is_mnist_dcgan_with_labels():
    configs = {p.stem: load_config(p) for p in PRESETS}
    conditional, plain = configs["mnist-cdcgan"], configs["mnist-dcgan"]
    assert conditional.model == replace(plain.model, conditional=True)
    assert (conditional.data, conditional.loss, conditional.optim) == (plain.data, plain.loss, plain.optim)
    assert model_name(conditional) != model_name(plain), "a generator taking labels has its own registered name"
