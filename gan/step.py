"""One optimisation step each: d_step changes only D, g_step changes only G, ema_update tracks G."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan.config import LossConfig
from gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty
from gan.models.heads import realness_logit


@dataclass
class StepStats:
    """What one step measured; tensors stay on the device so a step never waits for the GPU."""

    loss: Tensor
    grad_norm: Tensor
    real_score: Tensor | None = None
    fake_score: Tensor | None = None
    finite: bool = True


def _grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync when D is wrapped: the G step must not all-reduce (or wait for) D's gradients."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def _apply(opt: torch.optim.Optimizer, module: nn.Module, loss: Tensor) -> tuple[Tensor, bool]:
    """Backward, then step only if loss and (all-reduced) gradients are finite, so every rank agrees."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = _grad_norm(module)
    finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(loss.detach()))
    if finite:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    return norm, finite


def d_step(G: nn.Module, D: nn.Module, opt_d: torch.optim.Optimizer, real: Tensor, y: Tensor | None,
           z: Tensor, loss_cfg: LossConfig, fake: Tensor | None = None) -> StepStats:
    """One D update on a real batch and G(z) (or a given `fake`, detached here); G gets no gradient."""
    D.requires_grad_(True)
    if fake is None:
        with torch.no_grad():
            fake = G(z, y)
    fake = fake.detach()
    out_real = D(real, y)
    out_fake = D(fake, y)
    r, f = realness_logit(out_real), realness_logit(out_fake)
    loss = d_loss(loss_cfg.kind, r, f)
    if loss_cfg.kind == "wgan-gp" and loss_cfg.gp_weight > 0:
        loss = loss + loss_cfg.gp_weight * gradient_penalty(lambda x: realness_logit(D(x, y)), real, fake)
    if loss_cfg.r1_gamma > 0:
        loss = loss + 0.5 * loss_cfg.r1_gamma * r1_penalty(lambda x: realness_logit(D(x, y)), real)
    if out_real.dim() == 2 and y is not None:
        loss = loss + _supervised_loss(out_real, y)
    norm, finite = _apply(opt_d, D, loss)
    return StepStats(loss.detach(), norm, torch.sigmoid(r.detach()).mean(), torch.sigmoid(f.detach()).mean(),
                     finite)


def _supervised_loss(out: Tensor, y: Tensor) -> Tensor:
    """Semi-supervised GAN: cross-entropy over the K class logits on the labelled rows (y >= 0)."""
    labelled = y >= 0
    class_logits = out[:, :-1]
    # A batch with no labelled row still joins the graph, so every rank's D gets the same gradient set.
    per_row = F.cross_entropy(class_logits, y.clamp(min=0), reduction="none")
    return (per_row * labelled).sum() / labelled.sum().clamp(min=1)


def g_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, z: Tensor, y: Tensor | None,
           loss_cfg: LossConfig, fake: Tensor | None = None) -> StepStats:
    """One G update through a frozen D; D's parameters get no gradient and are not all-reduced.

    `fake` may be G(z, y) from the D step, still attached to G's graph (the textbook loop's saving of one G
    forward); G's weights must not have changed since it was computed."""
    D.requires_grad_(False)
    try:
        with _no_sync(D):
            out_fake = D(G(z, y) if fake is None else fake, y)
            f = realness_logit(out_fake)
            loss = g_loss(loss_cfg.kind, f)
            norm, finite = _apply(opt_g, G, loss)
    finally:
        D.requires_grad_(True)
    return StepStats(loss.detach(), norm, None, torch.sigmoid(f.detach()).mean(), finite)


@torch.no_grad()
def ema_update(G_ema: nn.Module, G: nn.Module, decay: float) -> None:
    """G_ema <- decay * G_ema + (1 - decay) * G for parameters; buffers (BN statistics) are copied."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)
