"""The residual family: shapes and range at every resolution and channel count, G's blocks that start as the identity,
no normalisation layer, the heads of the other families, and a short CPU fit on digits that lowers its FID."""

import pytest
import torch
from torch import nn

from gan.config import ConfigError, ModelConfig
from gan.config_loader import load_config
from gan.data import prepare, read_split, to_model_range
from gan.loop import DataSpec, fit
from gan.metrics.evaluator import train_evaluator
from gan.metrics.image_metrics import evaluate_images, latent_sampler
from gan.models import build_models
from gan.models.resnet import ResidualBlock


def make(shape, **kw):
    torch.manual_seed(0)
    return build_models(ModelConfig(family="resnet", g_width=8, d_width=8, z_dim=16, **kw), loss_kind="rpgan",
                        data_shape=shape, num_classes=10)


@pytest.mark.parametrize("resolution", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_range_at_every_resolution(resolution, channels):
    G, D = make((channels, resolution, resolution))
    z = 100 * torch.randn(5, 16)  # far out, to push the output past the images' range
    raw = G(z)
    assert raw.abs().max() > 1, "linear while training: no tanh to saturate"
    x = G.eval()(z)
    assert x.shape == (5, channels, resolution, resolution) and x.abs().max() <= 1, "clamped in eval mode"
    assert torch.equal(x, raw.clamp(-1, 1))
    assert D(x).shape == (5,)
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in [*G.modules(), *D.modules()])


def test_g_blocks_start_as_the_identity_and_d_blocks_do_not():
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(ResidualBlock(4)(x), x)
    assert not torch.allclose(ResidualBlock(4, identity_at_start=False)(x), x)
    G, D = make((1, 28, 28))
    g_blocks = [m for m in G.modules() if isinstance(m, ResidualBlock)]
    d_blocks = [m for m in D.modules() if isinstance(m, ResidualBlock)]
    assert len(g_blocks) == 3 and all(not b.conv2.weight.any() for b in g_blocks)
    assert len(d_blocks) == 2 and all(b.conv2.weight.any() for b in d_blocks)


def test_conditional_and_semi_supervised_heads():
    G, D = make((3, 32, 32), conditional=True)
    y = torch.arange(4) % 10
    x = G(torch.randn(4, 16), y)
    assert not torch.allclose(G(torch.zeros(2, 16), torch.tensor([0, 0])), G(torch.zeros(2, 16), torch.tensor([1, 1])))
    assert D(x, y).shape == (4,)
    _, D = make((1, 28, 28), semi_supervised=True)
    assert D(torch.rand(4, 1, 28, 28) * 2 - 1).shape == (4, 11)


def test_the_config_names_its_resolutions():
    with pytest.raises(ConfigError, match=r"data.resolution must be one of \(28, 32, 64, 128\) for resnet"):
        load_config(None, ["data.source=digits", "data.resolution=16", "model.family=resnet"])
    with pytest.raises(ConfigError, match="resnet needs image data"):
        load_config(None, ["model.family=resnet"])


def test_a_short_cpu_fit_on_digits_lowers_its_fid(tmp_path):
    cfg = load_config(None, ["data.source=digits", "model.family=resnet", "model.g_width=16", "model.d_width=16",
                             "model.z_dim=32", "loss.kind=rpgan", "loss.r1_gamma=0.1", "loss.r2_gamma=0.1",
                             "optim.beta1=0", "optim.beta2=0.99", "optim.lr_g=5e-4", "optim.lr_d=5e-4",
                             "train.batch_size=64", "train.kimg=4", "train.log_every_kimg=4",
                             "train.checkpoint_every_kimg=4"])
    x, y = read_split(prepare(cfg.data, tmp_path / "data"), "train")
    evaluator, _ = train_evaluator(x, y, x[:300], y[:300], epochs=2)
    real = to_model_range(x)

    def batches(e):
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(e))
        for i in range(len(real) // 64):
            yield real[order[i * 64:(i + 1) * 64]], None

    def fid(G):
        return evaluate_images(latent_sampler(G.eval(), 32), x, evaluator, num_samples=500, seed=1)["eval/fid_500"]

    torch.manual_seed(cfg.train.seed)
    untrained, _ = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=(1, 28, 28), num_classes=0)
    state = fit(cfg, batches, spec=DataSpec(shape=(1, 28, 28), num_classes=10), report=lambda m, c: None)
    before, after = fid(untrained), fid(state.G_ema)
    assert after < 0.8 * before, (before, after)
    with torch.no_grad():
        spread = state.G_ema(torch.randn(256, 32)).std(0).mean()
    # With a tanh output every sample went to the flat -1 background within 2 kimg on MNIST (spread ~0.002).
    assert spread > 0.5 * real[:256].std(0).mean(), "G's samples vary like the data's"
