"""Adversarial losses on logits (bce, hinge, wgan-gp, lsgan, rpgan) and the gradient penalties (WGAN-GP, R1, R2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def d_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """D's loss from realness logits of a real and a fake batch (penalties are added by the caller)."""
    if kind == "bce":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    if kind == "lsgan":
        return 0.5 * ((real - 1.0).pow(2).mean() + fake.pow(2).mean())
    if kind == "rpgan":  # pairs: the i-th real against the i-th fake
        return F.softplus(fake - real).mean()
    raise ValueError(f"loss.kind must be one of bce, hinge, wgan-gp, lsgan, rpgan, got {kind!r}")


def g_loss(kind: str, fake: Tensor, real: Tensor | None = None) -> Tensor:
    """G's loss from D's realness logits of a fake batch (and, for rpgan, of the paired real batch); bce is the
    non-saturating -log D(G(z))."""
    if kind == "bce":
        return F.softplus(-fake).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * (fake - 1.0).pow(2).mean()
    if kind == "rpgan":
        if real is None:
            raise ValueError("rpgan's G loss pairs each fake with a real sample: pass real")
        return F.softplus(real - fake).mean()
    raise ValueError(f"loss.kind must be one of bce, hinge, wgan-gp, lsgan, rpgan, got {kind!r}")


def _input_grad_norm_sq(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP: E[(|grad_x D(x_hat)| - 1)^2] on random interpolates x_hat of real and fake."""
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    x_hat = alpha * real.detach() + (1.0 - alpha) * fake.detach()
    norm = (_input_grad_norm_sq(critic, x_hat) + 1e-12).sqrt()
    return (norm - 1.0).pow(2).mean()


def r1_penalty(critic: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E[|grad_x D(x)|^2] on real data; the caller scales it by gamma / 2."""
    return _input_grad_norm_sq(critic, real).mean()


def r2_penalty(critic: Callable[[Tensor], Tensor], fake: Tensor) -> Tensor:
    """R2 (Huang et al. 2024, R3GAN): R1's E[|grad_x D(x)|^2] on generated data; the caller scales it by gamma / 2."""
    return _input_grad_norm_sq(critic, fake).mean()
