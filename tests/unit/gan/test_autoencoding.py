"""The autoencoder families' step: the ELBO's terms against torch.distributions' closed forms, the reparameterised
sample, one update of encoder and decoder equal to one Adam over both, skipped non-finite steps, and the held-out
reconstruction error against a decoder whose output is known."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from gan.autoencoding import (
    autoencoder_step,
    gaussian_kl,
    negative_elbo,
    pixels,
    reconstruction_metrics,
    reconstruction_nll,
    reparameterise,
)
from gan.config import ModelConfig
from gan.models import build_models

SHAPE = (1, 8, 8)


def make(family="vae", **kw):
    torch.manual_seed(0)
    model = ModelConfig(family=family, z_dim=4, encoder_hidden=(16,), decoder_hidden=(16,), **kw)
    decoder, encoder = build_models(model, loss_kind="bce", data_shape=SHAPE, num_classes=0)
    return model, decoder, encoder


def images(n=6, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_of_a_diagonal_gaussian_to_the_prior_is_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2)), "q = prior: no KL"


def test_bernoulli_likelihood_is_torch_distributions_and_the_bce_of_grey_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, *SHAPE, generator=g)
    binary = torch.randint(0, 2, (4, *SHAPE), generator=g).float()
    expected = -Bernoulli(logits=logits).log_prob(binary).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, binary, "bernoulli"), expected)
    grey = torch.rand(4, *SHAPE, generator=g)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), grey, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, grey, "bernoulli"), bce)


def test_gaussian_likelihood_is_torch_distributions_with_its_sigma():
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(3, *SHAPE, generator=g), torch.rand(3, *SHAPE, generator=g)
    for log_sigma in (None, torch.tensor(-1.5)):
        sigma = 1.0 if log_sigma is None else torch.exp(log_sigma)
        expected = -Normal(torch.sigmoid(logits), sigma).log_prob(target).flatten(1).sum(1)
        torch.testing.assert_close(reconstruction_nll(logits, target, "gaussian", log_sigma), expected)
    with pytest.raises(ValueError, match="likelihood"):
        reconstruction_nll(logits, target, "laplace")


def test_the_reparameterised_sample_has_the_posterior_moments_and_its_gradients():
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(0.25)], requires_grad=True)
    torch.manual_seed(0)
    z = reparameterise(mu.expand(200_000, 2), logvar.expand(200_000, 2))
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5]), atol=0.01, rtol=0)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.full((2,), 200_000.0))  # dz/dmu = 1
    assert logvar.grad.abs().min() > 0


def test_the_vae_loss_is_its_reconstruction_plus_beta_kl_and_the_ae_loss_its_reconstruction():
    x = images()
    for beta in (1.0, 4.0):
        model, decoder, encoder = make(beta=beta)
        torch.manual_seed(3)
        loss, terms = negative_elbo(decoder, encoder, x, model)
        mu, logvar = encoder(x)
        torch.manual_seed(3)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        nll = reconstruction_nll(decoder(z, logits=True), pixels(x), "bernoulli").mean()
        kl = gaussian_kl(mu, logvar).mean()
        torch.testing.assert_close(terms["loss/reconstruction"], nll.detach())
        torch.testing.assert_close(terms["loss/kl"], kl.detach())
        torch.testing.assert_close(loss, nll + beta * kl)
    model, decoder, encoder = make("ae")
    loss, terms = negative_elbo(decoder, encoder, x, model)
    assert terms == {}
    expected = reconstruction_nll(decoder(encoder(x), logits=True), pixels(x), "bernoulli").mean()
    torch.testing.assert_close(loss, expected)


def test_one_step_on_both_optimizers_equals_one_adam_over_both_networks():
    x = images()
    model, decoder, encoder = make()
    _, decoder2, encoder2 = make()
    opt_dec, opt_enc = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (decoder, encoder))
    joint = torch.optim.Adam([*decoder2.parameters(), *encoder2.parameters()], lr=1e-2)
    for step in range(3):
        torch.manual_seed(step)
        stats = autoencoder_step(decoder, encoder, opt_dec, opt_enc, x, model)
        torch.manual_seed(step)
        joint.zero_grad()
        negative_elbo(decoder2, encoder2, x, model)[0].backward()
        joint.step()
        assert stats.finite and set(stats.terms) == {"loss/reconstruction", "loss/kl"}
    for a, b in zip([*decoder.parameters(), *encoder.parameters()], [*decoder2.parameters(), *encoder2.parameters()]):
        torch.testing.assert_close(a, b)
    _, fresh, _ = make()
    assert not torch.equal(fresh.net[0].weight, decoder.net[0].weight), "the decoder trained"


def test_a_non_finite_batch_skips_the_step():
    model, decoder, encoder = make()
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (decoder, encoder)]
    before = [p.clone() for p in [*decoder.parameters(), *encoder.parameters()]]
    x = images()
    x[0, 0, 0, 0] = float("nan")
    stats = autoencoder_step(decoder, encoder, *opts, x, model)
    assert not stats.finite
    assert all(torch.equal(a, b) for a, b in zip(before, [*decoder.parameters(), *encoder.parameters()]))


def test_a_bf16_step_takes_its_loss_in_fp32():
    model, decoder, encoder = make(likelihood="gaussian")
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (decoder, encoder)]
    stats = autoencoder_step(decoder, encoder, *opts, images(), model,
                             precision=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert stats.finite and stats.loss.dtype == torch.float32
    assert decoder.log_sigma.grad is not None, "the Gaussian decoder learns its sigma"


def test_reconstruction_error_of_a_grey_decoder_is_known():
    _, decoder, encoder = make("ae")
    torch.nn.init.zeros_(decoder.net[-1].weight)
    torch.nn.init.zeros_(decoder.net[-1].bias)  # every pixel mean is sigmoid(0) = 1/2, whatever the code
    x = torch.randint(0, 256, (7, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics = reconstruction_metrics(encoder, decoder, x, batch_size=3, prefix="train/")
    target = x.float() / 255
    assert metrics["train/reconstruction_error"] == pytest.approx(float((target - 0.5).square().mean()), rel=1e-5)
    assert metrics["train/reconstruction_bce"] == pytest.approx(math.log(2), rel=1e-5)
