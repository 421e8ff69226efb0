"""One-step isolation: a D step changes only D, a G step only G, with every loss (R1 and R2 on) and, on images,
DiffAugment, feature matching and a labelled batch; the feature-matching and supervised losses' closed forms;
non-finite steps change nothing; EMA."""

import copy

import pytest
import torch

from gan.augment import diff_augment
from gan.config import LossConfig, ModelConfig
from gan.losses import d_loss
from gan.models import build_models
from gan.models.heads import realness_logit
from gan.step import d_step, ema_update, feature_matching_loss, g_step

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


def test_feature_matching_loss_closed_form():
    h_real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # batch mean (2, 3)
    h_fake = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # batch mean (1, 1)
    assert feature_matching_loss(h_real, h_fake).item() == pytest.approx((1 ** 2 + 2 ** 2) / 2)
    assert feature_matching_loss(h_real, h_real.flip(0)).item() == 0, "only the batch means are matched"


@pytest.mark.parametrize(("family", "shape", "k", "extra"), CASES)
def test_a_feature_matching_g_step_changes_only_g_and_its_loss_is_the_feature_gap(family, shape, k, extra):
    G, D, opt_g, opt_d, real, y, z = make(family, shape, k, extra, "bce")
    D.eval()  # deterministic features for the closed form
    with torch.no_grad():
        _, h_real = D(real, y, features=True)
        logits, h_fake = D(G(z, y), y, features=True)
    assert h_real.dim() == 2 and h_real.shape[0] == logits.shape[0], "(B, F) features beside the logits"
    expected = feature_matching_loss(h_real, h_fake)
    g0 = snapshot(G)
    d_params = [p.detach().clone() for p in D.parameters()]
    stats = g_step(G, D, opt_g, z, y, LossConfig(feature_matching=True), real=real)
    assert stats.finite and stats.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(d_params, D.parameters()))
    assert all(p.grad is None for p in D.parameters())
    assert not same({k: v for k, v in G.state_dict().items() if "weight" in k},
                    {k: v for k, v in g0.items() if "weight" in k})
    with pytest.raises(ValueError, match="feature_matching needs the real batch"):
        g_step(G, D, opt_g, z, y, LossConfig(feature_matching=True))


SEMI = [c for c in CASES if c[3].get("semi_supervised")] + [("mlp", (1, 8, 8), 10, {"semi_supervised": True})]


@pytest.mark.parametrize(("family", "shape", "k", "extra"), SEMI)
def test_a_labelled_batch_adds_its_class_cross_entropy_and_the_batch_labels_are_ignored(family, shape, k, extra):
    G, D, opt_g, opt_d, real, y, z = make(family, shape, k, extra, "bce")
    G.eval()
    D.eval()  # BatchNorm on running statistics: the closed form below sees what the step sees
    x_lab, y_lab = torch.rand(5, *shape) * 2 - 1, torch.tensor([4, 0, 9, 4, 1])
    with torch.no_grad():
        fake = G(z, None)
        adversarial = d_loss("bce", realness_logit(D(real)), realness_logit(D(fake)))
        supervised = torch.nn.functional.cross_entropy(D(x_lab)[:, :-1], y_lab)
    g0 = snapshot(G)
    d_copy = copy.deepcopy(D)
    stats = d_step(G, D, opt_d, real, y, z, LossConfig(), labelled=(x_lab, y_lab))
    assert stats.supervised.item() == pytest.approx(supervised.item(), rel=1e-5)
    assert stats.loss.item() == pytest.approx((adversarial + supervised).item(), rel=1e-5)
    assert same(G.state_dict(), g0) and all(p.grad is None for p in G.parameters())
    unlabelled = d_step(G, d_copy, torch.optim.Adam(d_copy.parameters()), real, torch.full_like(y, -1), z,
                        LossConfig(), labelled=(x_lab, y_lab))
    assert unlabelled.loss.item() == pytest.approx(stats.loss.item(), rel=1e-6), "the batch's own labels are unused"


def test_a_labelled_batch_needs_a_semi_supervised_d():
    G, D, opt_g, opt_d, real, y, z = make("dcgan", (1, 28, 28), 0, {}, "bce")
    with pytest.raises(ValueError, match="needs a semi-supervised D"):
        d_step(G, D, opt_d, real, y, z, LossConfig(), labelled=(real, torch.zeros(6, dtype=torch.long)))


def test_lazy_regularisation_weights_r1_and_r2_by_the_interval_on_its_steps_and_skips_them_between():
    """loss.reg_every=4: a regularising step's loss is the adversarial loss plus 4 x (gamma/2) x (R1 + R2), a step
    between has none of it (StyleGAN2's lazy regularisation), with an independent computation of the penalties."""
    G, D, _, opt_d, real, _, z = make("mlp", (2,), 0, {}, "bce")
    fake = G(z).detach()
    loss_cfg = LossConfig(kind="bce", r1_gamma=0.5, r2_gamma=2.0, reg_every=4)

    def grad_sq(x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(realness_logit(D(x)).sum(), x)
        return float(g.square().sum(1).mean())

    adversarial = float(d_loss("bce", realness_logit(D(real)), realness_logit(D(fake))))
    penalties = 4 * (0.25 * grad_sq(real) + 1.0 * grad_sq(fake))
    state = snapshot(D)
    lazy_off = d_step(G, D, opt_d, real, None, z, loss_cfg, fake=fake, regularize=False)
    D.load_state_dict(state)
    lazy_on = d_step(G, D, opt_d, real, None, z, loss_cfg, fake=fake, regularize=True)
    assert float(lazy_off.loss) == pytest.approx(adversarial, rel=1e-5)
    assert float(lazy_on.loss) == pytest.approx(adversarial + penalties, rel=1e-5)
    assert penalties > 1e-3, "the penalties are not negligible here, so the test can tell them apart"
