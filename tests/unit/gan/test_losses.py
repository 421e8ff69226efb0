"""Losses and penalties against closed forms."""

import math

import pytest
import torch

from gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty, r2_penalty


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_is_the_non_saturating_loss():
    real, fake = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    expected_d = (sp(-1.0) + sp(2.0)) / 2 + (sp(0.5) + sp(3.0)) / 2
    assert d_loss("bce", real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss("bce", fake).item() == pytest.approx((sp(-0.5) + sp(-3.0)) / 2, rel=1e-6)
    zero = torch.zeros(4)
    assert d_loss("bce", zero, zero).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert g_loss("bce", zero).item() == pytest.approx(math.log(2), rel=1e-6)


def test_hinge_wgan_lsgan_closed_forms():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert d_loss("hinge", real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.0) / 2)
    assert g_loss("hinge", fake).item() == pytest.approx(1.0)
    assert d_loss("wgan-gp", real, fake).item() == pytest.approx(-1.0 - 1.25)
    assert g_loss("wgan-gp", fake).item() == pytest.approx(1.0)
    assert d_loss("lsgan", real, fake).item() == pytest.approx(0.5 * ((1 + 0.25) / 2 + (4 + 0) / 2))
    assert g_loss("lsgan", fake).item() == pytest.approx(0.5 * (9 + 1) / 2)


def test_rpgan_judges_the_difference_of_paired_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    assert d_loss("rpgan", real, fake).item() == pytest.approx((sp(-2.0) + sp(1.0)) / 2, rel=1e-6)
    assert g_loss("rpgan", fake, real).item() == pytest.approx((sp(2.0) + sp(-1.0)) / 2, rel=1e-6)
    shifted = 5.0  # only differences count: adding a constant to every logit changes nothing
    assert d_loss("rpgan", real + shifted, fake + shifted).item() == pytest.approx(d_loss("rpgan", real, fake).item())
    with pytest.raises(ValueError, match="rpgan's G loss pairs each fake with a real sample"):
        g_loss("rpgan", fake)


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="loss.kind"):
        d_loss("nope", torch.zeros(1), torch.zeros(1))


def test_gradient_penalty_of_a_linear_critic_is_norm_minus_one_squared():
    w = torch.tensor([3.0, 0.0, 0.0, 0.0])
    critic = lambda x: x.flatten(1) @ w  # noqa: E731
    real, fake = torch.randn(16, 1, 2, 2), torch.randn(16, 1, 2, 2)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx((3.0 - 1.0) ** 2, rel=1e-5)
    unit = lambda x: x.flatten(1) @ (w / 3)  # noqa: E731
    assert gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_r1_of_a_quadratic_critic_is_the_mean_squared_norm():
    critic = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731
    real = torch.randn(32, 2)
    assert r1_penalty(critic, real).item() == pytest.approx(real.pow(2).sum(1).mean().item(), rel=1e-5)


def test_r2_is_r1_on_generated_samples():
    critic = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731
    fake = torch.randn(32, 1, 2, 2)
    assert r2_penalty(critic, fake).item() == pytest.approx(fake.flatten(1).pow(2).sum(1).mean().item(), rel=1e-5)


def test_penalties_are_differentiable_in_the_critic_weights():
    w = torch.tensor([2.0, 1.0], requires_grad=True)
    critic = lambda x: x @ w  # noqa: E731
    gradient_penalty(critic, torch.randn(8, 2), torch.randn(8, 2)).backward()
    norm = w.detach().norm()
    expected = 2 * (norm - 1) * w.detach() / norm
    assert torch.allclose(w.grad, expected, atol=1e-5)
