"""The autoencoder families' training step, beside the GANs' (gan/step.py): the reconstruction likelihood, the KL of
a diagonal Gaussian to the prior, the negative ELBO, one update of encoder and decoder on it, and the held-out
reconstruction error the ae family is scored by.

Images arrive in the model range [-1, 1]; the likelihoods read them as pixels in [0, 1]. As in gan/step.py, the
networks may run under autocast but the losses are taken on fp32 casts of their outputs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan.checkpoint import unwrap
from gan.config import ModelConfig
from gan.data.transforms import to_model_range
from gan.rendering import eval_mode
from gan.step import StepStats


@dataclass
class AutoencoderStats(StepStats):
    """A step's loss (per image, in nats) with its terms, keyed by their metric names (loss/reconstruction, loss/kl)."""

    terms: dict[str, Tensor] = field(default_factory=dict)


def pixels(x: Tensor) -> Tensor:
    """Model-range images [-1, 1] -> pixel values in [0, 1], the likelihoods' targets."""
    return (x.float() + 1.0) * 0.5


def reconstruction_nll(logits: Tensor, target: Tensor, likelihood: str, log_sigma: Tensor | None = None) -> Tensor:
    """-log p(x | z) per image (B,), summed over pixels, for pixel `logits` and `target` pixels in [0, 1].

    bernoulli: binary cross-entropy of sigmoid(logits) against the (grey) pixel values. gaussian: a Normal with mean
    sigmoid(logits) and standard deviation exp(log_sigma) (1 when None), its normalising constant included."""
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    if likelihood != "gaussian":
        raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
    log_sigma = torch.zeros((), device=logits.device) if log_sigma is None else log_sigma.float()
    z = (target - torch.sigmoid(logits)) * torch.exp(-log_sigma)
    return (0.5 * z.square() + log_sigma + 0.5 * math.log(2 * math.pi)).sum(1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row (B,), summed over the latent dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (torch.exp(logvar) + mu.square() - 1.0 - logvar).sum(1)


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): a sample of q(z | x) through which gradients reach mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def negative_elbo(decoder: nn.Module, encoder: nn.Module, real: Tensor, model: ModelConfig,
                  precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """The batch mean of the loss per image and of its terms. ae: -log p(x | encoder(x)). vae: the negative ELBO,
    -log p(x | z) + beta * KL(q(z | x) || N(0, I)) with z drawn from q by reparameterisation."""
    with precision():
        encoded = encoder(real)
        if isinstance(encoded, tuple):
            mu, logvar = (t.float() for t in encoded)
            z = reparameterise(mu, logvar)
        else:
            z = encoded
        logits = decoder(z, None, logits=True)
    sigma = unwrap(decoder).log_sigma
    nll = reconstruction_nll(logits, pixels(real), model.likelihood, sigma).mean()
    if not isinstance(encoded, tuple):
        return nll, {}
    kl = gaussian_kl(mu, logvar).mean()
    return nll + model.beta * kl, {"loss/reconstruction": nll.detach(), "loss/kl": kl.detach()}


def autoencoder_step(decoder: nn.Module, encoder: nn.Module, opt_dec: torch.optim.Optimizer,
                     opt_enc: torch.optim.Optimizer, real: Tensor, model: ModelConfig, *,
                     precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     scaler: torch.amp.GradScaler | None = None) -> AutoencoderStats:
    """One update of encoder and decoder on one loss (`negative_elbo`). Stepping both Adam optimizers equals one Adam
    over both networks (Adam is per parameter); under DDP the backward all-reduces both. A non-finite loss or gradient
    skips the step on every rank; with an fp16 `scaler` an overflow is the scaler's to skip."""
    loss, terms = negative_elbo(decoder, encoder, real, model, precision)
    opts = (opt_dec, opt_enc)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        for opt in opts:
            scaler.unscale_(opt)
    grads = [p.grad for m in (decoder, encoder) for p in m.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    finite = bool(torch.isfinite(loss.detach())) and (scaler is not None or bool(torch.isfinite(norm)))
    if scaler is not None:
        for opt in opts:
            scaler.step(opt)
        scaler.update()
    elif finite:
        for opt in opts:
            opt.step()
    else:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    return AutoencoderStats(loss.detach(), norm, finite=finite, terms=terms)


def encode(encoder: nn.Module, x: Tensor) -> Tensor:
    """The latent code of model-range images: the ae's code, the vae's posterior mean."""
    encoded = encoder(x)
    return encoded[0] if isinstance(encoded, tuple) else encoded


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> Tensor:
    """Model-range reconstructions of model-range images `x` (B, C, H, W), in eval mode, on the CPU."""
    with eval_mode(encoder), eval_mode(decoder):
        device = next(encoder.parameters()).device
        return decoder(encode(encoder, x.to(device))).float().cpu()


RECONSTRUCTION_ERROR = "reconstruction_error"
"""The ae's score: the mean squared error per pixel, pixels in [0, 1], between held-out images and their
reconstructions (the decoder's pixel means for the encoder's codes). The same measure under either likelihood, so
autoencoders trained with either compete; lower is better."""


@torch.no_grad()
def reconstruction_metrics(encoder: nn.Module, decoder: nn.Module, x_uint8: np.ndarray | Tensor, *,
                           batch_size: int = 500, prefix: str = "eval/") -> dict[str, float]:
    """Over all of `x_uint8` (N, C, H, W): <prefix>reconstruction_error (the mean squared error per pixel in [0, 1],
    the score) and <prefix>reconstruction_bce (binary cross-entropy per pixel, the Bernoulli likelihood's loss)."""
    x_all = torch.as_tensor(x_uint8)
    squared, bce, count = 0.0, 0.0, 0
    for i in range(0, len(x_all), batch_size):
        real = to_model_range(x_all[i:i + batch_size])
        target, mean = pixels(real), pixels(reconstruct(encoder, decoder, real))
        squared += float((mean - target).square().sum())
        bce += float(F.binary_cross_entropy(mean.clamp(1e-6, 1 - 1e-6), target, reduction="sum"))
        count += target.numel()
    if count == 0:
        raise ValueError("no images to reconstruct")
    return {f"{prefix}{RECONSTRUCTION_ERROR}": squared / count, f"{prefix}reconstruction_bce": bce / count}
