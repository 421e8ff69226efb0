"""PacGAN packing, random Fourier features in D and BatchNorm in the MLP G: closed forms, layouts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gan.config import ConfigError, ModelConfig
from gan.config_loader import load_config
from gan.models import build_models
from gan.models.heads import FourierFeatures, pack_samples


def build(data_shape, **kw):
    torch.manual_seed(0)
    return build_models(ModelConfig(**kw), loss_kind="bce", data_shape=data_shape, num_classes=0)


def test_pack_samples_joins_consecutive_samples():
    x = torch.arange(12.0).view(6, 2)
    packed = pack_samples(x, 3)
    assert packed.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    images = torch.randn(4, 3, 5, 5)
    stacked = pack_samples(images, 2)
    assert stacked.shape == (2, 6, 5, 5)
    assert torch.equal(stacked[1, 3:], images[3])
    assert pack_samples(x, 1) is x


def test_pack_samples_rejects_a_batch_that_is_no_multiple():
    with pytest.raises(ValueError, match="model.pack=4 needs batches whose size is a multiple of it, got 6"):
        pack_samples(torch.zeros(6, 2), 4)


def test_fourier_features_closed_form_and_fixed_draw():
    ff = FourierFeatures(2, 8, scale=3.0)
    x = torch.randn(5, 2)
    out = ff(x)
    assert out.shape == (5, 2 + 16)
    h = x @ ff.weight
    assert torch.equal(out[:, :2], x)
    torch.testing.assert_close(out[:, 2:10], torch.sin(h))
    torch.testing.assert_close(out[:, 2:10].pow(2) + out[:, 10:].pow(2), torch.ones(5, 8))
    assert abs(ff.weight.std().item() - 3.0) < 1.5
    # Seeded, and saved with D: every worker and every reload sees the same frequencies.
    assert torch.equal(FourierFeatures(2, 8, scale=3.0).weight, ff.weight)
    assert "weight" in ff.state_dict()


def test_packed_mlp_d_judges_groups_of_samples():
    _, D = build((2,), hidden=(16, 16), pack=4)
    first = next(m for m in D.modules() if isinstance(m, nn.Linear))
    assert first.in_features == 2 * 4
    x = torch.randn(8, 2)
    out = D(x)
    assert out.shape == (2,)
    # The same as a plain MLP on the concatenated samples: the second logit sees samples 4..7 only.
    changed = x.clone()
    changed[5] += 1.0
    moved = D(changed)
    assert moved[0] == out[0] and moved[1] != out[1]


def test_fourier_mlp_d_layout_and_gradient_to_inputs():
    _, D = build((2,), hidden=(16,), pack=2, d_fourier_features=8, d_fourier_scale=5.0)
    first = next(m for m in D.modules() if isinstance(m, nn.Linear))
    assert first.in_features == (2 + 2 * 8) * 2
    x = torch.randn(6, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(D(x).sum(), x)
    assert grad.shape == (6, 2) and grad.abs().sum() > 0  # R1 works through the features and the packing


def test_packed_dcgan_d_stacks_channels():
    _, D = build((1, 28, 28), family="dcgan", g_width=8, d_width=8, pack=3)
    first = next(m for m in D.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 3
    assert D(torch.randn(6, 1, 28, 28)).shape == (2,)


def test_mlp_g_batch_norm_layout():
    G, _ = build((2,), hidden=(32, 32, 32), g_batch_norm=True)
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm1d)]
    linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    assert [n.num_features for n in norms] == [32, 32, 32]
    assert [lin.bias is None for lin in linears] == [True, True, True, False]
    plain, _ = build((2,), hidden=(32, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    # BN's shift replaces each hidden bias; its scale is the only addition.
    assert sum(p.numel() for p in G.parameters()) - sum(p.numel() for p in plain.parameters()) == 3 * 32
    G.eval()
    assert G(torch.randn(5, 100)).shape == (5, 2)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.pack=0"], "model.pack must be >= 1, got 0"),
    (["data.source=digits", "model.conditional=true", "model.pack=2"], "model.pack must be 1 with model.conditional"),
    (["train.batch_size=64", "scale.num_workers=2", "model.pack=3"],
     "train.batch_size per worker (/ scale.num_workers=2) must be a multiple of model.pack=3, got 64"),
    (["model.d_fourier_features=-1"], "model.d_fourier_features must be >= 0"),
    (["model.d_fourier_scale=0"], "model.d_fourier_scale must be > 0"),
    (["data.source=digits", "model.family=dcgan", "model.d_fourier_features=8"],
     "model.d_fourier_features is for the mlp family"),
    (["data.source=digits", "model.family=dcgan", "model.g_batch_norm=true"],
     "model.g_batch_norm is for the mlp family"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)

