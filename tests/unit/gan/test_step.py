"""One-step isolation: a D step changes only D, a G step only G, with every loss (R1 and R2 on) and, on images,
DiffAugment; non-finite steps change nothing; EMA."""

import copy

import pytest
import torch

from gan.augment import diff_augment
from gan.config import LossConfig, ModelConfig
from gan.models import build_models
from gan.step import d_step, ema_update, g_step

CASES = [
    ("mlp", (2,), 0, {}),
    ("mlp", (1, 28, 28), 10, {"conditional": True}),
    ("dcgan", (1, 28, 28), 0, {}),
    ("dcgan", (3, 32, 32), 10, {"conditional": True}),
    ("dcgan", (1, 28, 28), 10, {"semi_supervised": True}),
    ("mlp", (2,), 0, {"pack": 2, "d_fourier_features": 4, "g_batch_norm": True}),
    ("dcgan", (1, 28, 28), 0, {"pack": 3, "d_convs_per_stage": 2}),
    ("resnet", (3, 32, 32), 10, {"conditional": True}),
    ("resnet", (1, 28, 28), 10, {"semi_supervised": True}),
    ("resnet", (1, 28, 28), 0, {"pack": 2}),
]
LOSSES = ["bce", "hinge", "wgan-gp", "lsgan", "rpgan"]


def make(family, shape, k, extra, loss):
    torch.manual_seed(0)
    hidden = (16,) if shape == (2,) else (32, 64)
    mcfg = ModelConfig(family=family, z_dim=8, hidden=hidden, g_width=8, d_width=8, **extra)
    G, D = build_models(mcfg, loss_kind=loss, data_shape=shape, num_classes=k)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2)
    real = torch.rand(6, *shape) * 2 - 1
    y = torch.tensor([0, 1, 2, -1, 3, -1]) if extra.get("semi_supervised") else (
        torch.arange(6) % k if k else None)
    return G, D, opt_g, opt_d, real, y, torch.randn(6, 8)


def snapshot(m):
    return copy.deepcopy(m.state_dict())


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("family", "shape", "k", "extra"), CASES)
def test_d_step_changes_only_d(family, shape, k, extra, loss):
    G, D, opt_g, opt_d, real, y, z = make(family, shape, k, extra, loss)
    g0, d0 = snapshot(G), snapshot(D)
    G.eval()  # else the no-grad forward moves G's BN statistics, which is no weight change
    augment = diff_augment("color,translation,cutout") if len(shape) == 3 else None
    stats = d_step(G, D, opt_d, real, y, z, LossConfig(kind=loss, r1_gamma=1.0, r2_gamma=1.0), augment=augment)
    assert stats.finite and torch.isfinite(stats.loss)
    assert same(G.state_dict(), g0)
    assert all(p.grad is None for p in G.parameters())
    assert not same({k: v for k, v in D.state_dict().items() if "weight" in k},
                    {k: v for k, v in d0.items() if "weight" in k})
    assert all(p.grad is not None for p in D.parameters()), "every D parameter takes part"


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("family", "shape", "k", "extra"), CASES)
def test_g_step_changes_only_g_and_computes_no_d_gradient(family, shape, k, extra, loss):
    G, D, opt_g, opt_d, real, y, z = make(family, shape, k, extra, loss)
    D.eval()
    g0 = snapshot(G)
    d_params = [p.detach().clone() for p in D.parameters()]
    augment = diff_augment("color,translation,cutout") if len(shape) == 3 else None
    stats = g_step(G, D, opt_g, z, y, LossConfig(kind=loss), real=real, augment=augment)
    assert stats.finite
    assert all(torch.equal(a, b) for a, b in zip(d_params, D.parameters()))
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters()), "D is trainable again after the G step"
    assert not same({k: v for k, v in G.state_dict().items() if "weight" in k},
                    {k: v for k, v in g0.items() if "weight" in k})


def test_non_finite_d_step_is_skipped():
    G, D, opt_g, opt_d, real, y, z = make("mlp", (2,), 0, {}, "bce")
    d0 = snapshot(D)
    real[0, 0] = float("nan")
    stats = d_step(G, D, opt_d, real, y, z, LossConfig())
    assert not stats.finite
    assert same(D.state_dict(), d0)
    assert all(len(s) == 0 for s in opt_d.state.values()) or not opt_d.state


def test_ema_update_closed_form():
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G[1].running_mean.fill_(5.0)
    before = [p.clone() for p in G_ema.parameters()]
    ema_update(G_ema, G, decay=0.9)
    for b, e, p in zip(before, G_ema.parameters(), G.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    assert torch.equal(G_ema[1].running_mean, torch.full((2,), 5.0))
