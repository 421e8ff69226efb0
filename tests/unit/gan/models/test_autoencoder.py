"""The autoencoder families: shapes and ranges, the reference autoencoder's layers, the settings refused for them,
a search over families, the checkpoint's encoder and decoder, and a short CPU fit on digits that lowers the VAE's
loss and FID and the autoencoder's loss and reconstruction error."""

import pytest
import torch
from torch import nn

from gan.autoencoding import encode, reconstruction_metrics
from gan.config import ConfigError, ModelConfig
from gan.config_loader import load_config
from gan.data import prepare, read_split, to_model_range
from gan.loop import DataSpec, fit, save_state
from gan.metrics.evaluator import train_evaluator
from gan.metrics.image_metrics import evaluate_images, latent_sampler
from gan.metrics.in_training import CheckpointScorer, score_key
from gan.models import build_models
from gan.scoring import autoencoder_from_checkpoint, primary_generator


def make(family, shape, **kw):
    torch.manual_seed(0)
    return build_models(ModelConfig(family=family, z_dim=8, **kw), loss_kind="bce", data_shape=shape, num_classes=10)


@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 28, 28), (3, 32, 32)])
def test_shapes_and_ranges(shape):
    decoder, encoder = make("vae", shape, encoder_hidden=(32,), decoder_hidden=(32,))
    x = decoder(torch.randn(5, 8))
    assert x.shape == (5, *shape) and x.abs().max() < 1, "the decoder is a generator in the model range"
    logits = decoder(torch.randn(5, 8), logits=True)
    assert logits.shape == (5, *shape)
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (5, 8)
    decoder, encoder = make("ae", shape)
    code = encoder(decoder(torch.randn(5, 8)))
    assert code.shape == (5, 8) and code.min() >= 0, "the ae's code comes out of a ReLU"
    assert torch.equal(encode(encoder, x), encoder(x))
    assert torch.equal(encode(make("vae", shape)[1], x), make("vae", shape)[1](x)[0]), "a VAE's code is its mean"


def test_the_reference_autoencoder_is_784_32_128_and_back():
    decoder, encoder = build_models(ModelConfig(family="ae", z_dim=128), loss_kind="bce", data_shape=(1, 28, 28),
                                    num_classes=10)
    linear = [(m.in_features, m.out_features) for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert linear == [(784, 32), (32, 128)]
    assert sum(isinstance(m, nn.ReLU) for m in encoder.modules()) == 2
    assert [(m.in_features, m.out_features) for m in decoder.modules() if isinstance(m, nn.Linear)] == [(128, 784)]
    assert decoder.log_sigma is None and decoder.z_dim == 128


def test_only_the_gaussian_vae_learns_a_pixel_sigma():
    assert make("vae", (1, 16, 16), likelihood="gaussian")[0].log_sigma is not None
    assert make("vae", (1, 16, 16))[0].log_sigma is None
    assert make("ae", (1, 16, 16), likelihood="gaussian")[0].log_sigma is None


@pytest.mark.parametrize(("overrides", "key"), [
    (["model.family=ae", "model.conditional=true"], "model.conditional"),
    (["model.family=vae", "model.semi_supervised=true"], "model.semi_supervised"),
    (["model.family=vae", "model.pack=2"], "model.pack"),
    (["model.family=ae", "model.diffaugment=color"], "model.diffaugment"),
    (["model.family=vae", "model.likelihood=laplace"], "model.likelihood"),
    (["model.family=vae", "model.beta=0"], "model.beta"),
    (["model.family=ae", "loss.kind=hinge"], "loss.kind"),
    (["model.family=vae", "loss.r1_gamma=1"], "loss.r1_gamma"),
    (["model.family=vae", "loss.n_critic=5"], "loss.n_critic"),
    (["model.family=vae", "data.source=ring8"], "model.family"),
])
def test_settings_that_mean_nothing_to_an_autoencoder_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} "):
        load_config(None, ["data.source=digits", *overrides])


def test_a_search_may_put_the_vae_beside_the_gans_but_not_the_ae():
    cfg = load_config(None, ["data.source=digits", "model.family=dcgan", "train.fid_every_kimg=5",
                             "tune.space={model.family: {choice: [dcgan, vae]}, "
                             "model.decoder_hidden: {choice: [[64], [256]], when: {model.family: vae}}}"])
    assert cfg.tune.space["model.family"] == {"choice": ["dcgan", "vae"]}
    load_config(None, ["data.source=digits", "model.family=ae", "train.fid_every_kimg=5",
                       "tune.space={model.z_dim: {choice: [16, 32]}}"])
    with pytest.raises(ConfigError, match=r"^tune.space.model.family cannot mix ae"):
        load_config(None, ["data.source=digits", "model.family=vae", "train.fid_every_kimg=5",
                           "tune.space={model.family: {choice: [ae, vae]}}"])


def _digits(tmp_path, cfg):
    dataset_dir = prepare(cfg.data, tmp_path / "data")
    x, y = read_split(dataset_dir, "train")
    real = to_model_range(x)

    def batches(e):
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(e))
        for i in range(len(real) // 64):
            yield real[order[i * 64:(i + 1) * 64]], None
    return x, y, batches, dataset_dir


def _fit(cfg, batches):
    reports = []
    state = fit(cfg, batches, spec=DataSpec(shape=(1, 28, 28), num_classes=10),
                report=lambda m, c: reports.append(m))
    return state, reports


FAST = ["data.source=digits", "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0.9", "train.batch_size=64",
        "train.kimg=12", "train.log_every_kimg=2", "train.checkpoint_every_kimg=12"]


def test_a_short_cpu_fit_on_digits_lowers_the_vae_loss_and_fid(tmp_path):
    cfg = load_config(None, [*FAST, "model.family=vae", "model.z_dim=8", "model.encoder_hidden=[256]",
                             "model.decoder_hidden=[256]"])
    x, y, batches, _ = _digits(tmp_path, cfg)
    evaluator, _ = train_evaluator(x, y, x[:300], y[:300], epochs=2)

    def fid(G):
        return evaluate_images(latent_sampler(G.eval(), 8), x, evaluator, num_samples=500, seed=1)["eval/fid_500"]

    torch.manual_seed(cfg.train.seed)
    untrained, _ = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=(1, 28, 28), num_classes=0)
    state, reports = _fit(cfg, batches)
    first, last = reports[0], reports[-1]
    assert last["loss/vae"] < 0.85 * first["loss/vae"], (first, last)
    assert last["loss/vae"] == pytest.approx(last["loss/reconstruction"] + last["loss/kl"], rel=1e-4)
    assert last["loss/kl"] > 1, "the posterior is not the prior: the latent carries information"
    before, after = fid(untrained), fid(state.G_ema)
    assert after < 0.5 * before, (before, after)


def test_a_short_cpu_fit_on_digits_lowers_the_ae_loss_and_reconstruction_error(tmp_path):
    cfg = load_config(None, [*FAST, "model.family=ae", "model.z_dim=32"])
    x, _, batches, dataset_dir = _digits(tmp_path, cfg)
    torch.manual_seed(cfg.train.seed)
    untrained_decoder, untrained_encoder = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=(1, 28, 28),
                                                        num_classes=0)
    state, reports = _fit(cfg, batches)
    assert reports[-1]["loss/ae"] < 0.85 * reports[0]["loss/ae"], (reports[0], reports[-1])
    held_out = x[:300]
    before = reconstruction_metrics(untrained_encoder, untrained_decoder, held_out)["eval/reconstruction_error"]
    after = reconstruction_metrics(state.D, state.G, held_out)["eval/reconstruction_error"]
    assert after < 0.5 * before, (before, after)
    # The checkpoint gives back the encoder and the decoder it was trained with (G, never G_ema).
    spec = DataSpec(shape=(1, 28, 28), num_classes=10)
    checkpoint = save_state(state, tmp_path / "ckpt", cfg, spec)
    encoder, decoder, loaded_cfg, _ = autoencoder_from_checkpoint(checkpoint)
    assert primary_generator(loaded_cfg) == "G"
    assert reconstruction_metrics(encoder, decoder, held_out)["eval/reconstruction_error"] == after
    # In training, it is scored by its reconstruction error of training images, with no evaluator network.
    scored = CheckpointScorer(cfg, dataset_dir, None)(checkpoint)
    assert score_key(cfg) == "train/reconstruction_error"
    assert scored.keys() == {score_key(cfg), "train/reconstruction_bce"}
    expected = reconstruction_metrics(encoder, decoder, x)["eval/reconstruction_error"]  # digits: < fid_samples
    assert scored[score_key(cfg)] == pytest.approx(expected)
