"""One optimisation step each: d_step changes only D, g_step changes only G, ema_update tracks G.

Under autocast (scale.precision bf16/fp16) the networks' forwards run in low precision, but the losses are taken on
fp32 logits (softplus and squares of bf16 logits lose the small differences the gradients live on), the R1 and
gradient penalties run D in fp32 with autocast off (their second backward differentiates an input gradient, which
low precision rounds to noise), and G_ema averages the fp32 weights autocast leaves untouched."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan.config import LossConfig
from gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty, r2_penalty
from gan.models.heads import realness_logit

Augment = Callable[[Tensor], Tensor]
"""DiffAugment (gan.augment.diff_augment): a differentiable random transform of a batch of images."""


@dataclass
class StepStats:
    """What one step measured; tensors stay on the device so a step never waits for the GPU."""

    loss: Tensor
    grad_norm: Tensor
    real_score: Tensor | None = None
    fake_score: Tensor | None = None
    finite: bool = True
    supervised: Tensor | None = None
    """A semi-supervised D step's cross-entropy on its labelled rows (part of `loss`)."""


def _grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's no_sync when D is wrapped: the G step must not all-reduce (or wait for) D's gradients."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def _apply(opt: torch.optim.Optimizer, module: nn.Module, loss: Tensor,
           scaler: torch.amp.GradScaler | None = None) -> tuple[Tensor, bool]:
    """Backward, then step only if loss and (all-reduced) gradients are finite, so every rank agrees.

    With an fp16 `scaler`, overflowing gradients are the scaler's to handle (it skips the step and lowers the
    scale), so only a non-finite loss counts as a non-finite step."""
    opt.zero_grad(set_to_none=True)
    loss_finite = bool(torch.isfinite(loss.detach()))
    if scaler is None:
        loss.backward()
        norm = _grad_norm(module)
        finite = bool(torch.isfinite(norm)) and loss_finite
        if finite:
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
        return norm, finite
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = _grad_norm(module)
    scaler.step(opt)
    scaler.update()
    return norm, loss_finite


def d_step(G: nn.Module, D: nn.Module, opt_d: torch.optim.Optimizer, real: Tensor, y: Tensor | None,
           z: Tensor, loss_cfg: LossConfig, fake: Tensor | None = None,
           scaler: torch.amp.GradScaler | None = None, augment: Augment | None = None,
           labelled: tuple[Tensor, Tensor] | None = None, regularize: bool = True) -> StepStats:
    """One D update on a real batch and G(z) (or a given `fake`, detached here); G gets no gradient. `augment`
    (DiffAugment) transforms every image D sees, the penalties' inputs included. R1 and R2 apply only when
    `regularize` (every loss.reg_every-th step, weighted by it).

    A semi-supervised (K+1) D adds the cross-entropy of its class logits on `labelled` (x, y), a batch of the
    labelled pool (Salimans et al. 2016); without one, on the rows of `real` whose y is >= 0."""
    D.requires_grad_(True)
    if fake is None:
        with torch.no_grad():
            fake = G(z, y)
    fake = fake.detach()
    if augment is not None:
        real, fake = augment(real), augment(fake)
    out_real = D(real, y).float()
    out_fake = D(fake, y).float()
    r, f = realness_logit(out_real), realness_logit(out_fake)
    loss = d_loss(loss_cfg.kind, r, f) + _penalties(D, real, fake, y, loss_cfg, regularize)
    supervised = None
    if labelled is not None:
        x_lab, y_lab = labelled
        out_lab = D(x_lab if augment is None else augment(x_lab), y_lab).float()
        supervised = F.cross_entropy(_class_logits(out_lab), y_lab)
    elif out_real.dim() == 2 and y is not None:
        supervised = _supervised_loss(out_real, y)
    if supervised is not None:
        loss = loss + supervised
    norm, finite = _apply(opt_d, D, loss, scaler)
    return StepStats(loss.detach(), norm, torch.sigmoid(r.detach()).mean(), torch.sigmoid(f.detach()).mean(),
                     finite, None if supervised is None else supervised.detach())


def _penalties(D: nn.Module, real: Tensor, fake: Tensor, y: Tensor | None, loss_cfg: LossConfig,
               regularize: bool = True) -> Tensor | float:
    """WGAN-GP's gradient penalty, and when `regularize` R1 and R2 weighted by loss.reg_every (lazy regularisation),
    in fp32 (see the module's docstring); 0 when all are off."""
    total: Tensor | float = 0.0
    with torch.autocast(real.device.type, enabled=False):
        def critic(x: Tensor) -> Tensor:
            return realness_logit(D(x.float(), y))
        if loss_cfg.kind == "wgan-gp" and loss_cfg.gp_weight > 0:
            total = total + loss_cfg.gp_weight * gradient_penalty(critic, real.float(), fake.float())
        lazy = loss_cfg.reg_every if regularize else 0
        if loss_cfg.r1_gamma > 0 and lazy:
            total = total + 0.5 * loss_cfg.r1_gamma * lazy * r1_penalty(critic, real.float())
        if loss_cfg.r2_gamma > 0 and lazy:
            total = total + 0.5 * loss_cfg.r2_gamma * lazy * r2_penalty(critic, fake.float())
    return total


def _class_logits(out: Tensor) -> Tensor:
    """A semi-supervised D's (B, K) class logits from its (B, K+1) output; a clear error for any other D."""
    if out.dim() != 2:
        raise ValueError(f"a labelled batch needs a semi-supervised D with (B, K+1) outputs, got {tuple(out.shape)}")
    return out[:, :-1]


def _supervised_loss(out: Tensor, y: Tensor) -> Tensor:
    """Semi-supervised GAN: cross-entropy over the K class logits on the labelled rows (y >= 0)."""
    labelled = y >= 0
    # A batch with no labelled row still joins the graph, so every rank's D gets the same gradient set.
    per_row = F.cross_entropy(_class_logits(out), y.clamp(min=0), reduction="none")
    return (per_row * labelled).sum() / labelled.sum().clamp(min=1)


def feature_matching_loss(h_real: Tensor, h_fake: Tensor) -> Tensor:
    """||mean_b h_real - mean_b h_fake||^2 / F for (B, F) features of D's last hidden layer (Salimans et al. 2016,
    averaged over the F features as in their code, so the scale does not grow with D's width)."""
    return (h_real.float().mean(0) - h_fake.float().mean(0)).square().mean()


def g_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, z: Tensor, y: Tensor | None,
           loss_cfg: LossConfig, fake: Tensor | None = None,
           scaler: torch.amp.GradScaler | None = None, real: Tensor | None = None,
           augment: Augment | None = None) -> StepStats:
    """One G update through a frozen D; D's parameters get no gradient and are not all-reduced.

    `fake` may be G(z, y) from the D step, still attached to G's graph (the textbook loop's saving of one G
    forward); G's weights must not have changed since it was computed. rpgan pairs the fakes with `real`, and
    loss.feature_matching matches the fakes' mean features in D's last hidden layer to `real`'s instead."""
    if loss_cfg.feature_matching and real is None:
        raise ValueError("loss.feature_matching needs the real batch (g_step's `real`)")
    D.requires_grad_(False)
    try:
        with _no_sync(D):
            fake = G(z, y) if fake is None else fake
            fm = loss_cfg.feature_matching
            out_fake, h_fake = _judge(D, fake if augment is None else augment(fake), y, fm)
            f = realness_logit(out_fake.float())
            r = h_real = None
            if real is not None and (loss_cfg.kind == "rpgan" or fm):
                with torch.no_grad():  # the real side holds no G parameter
                    out_real, h_real = _judge(D, real if augment is None else augment(real), y, fm)
                    r = realness_logit(out_real.float())
            loss = feature_matching_loss(h_real, h_fake) if fm else g_loss(loss_cfg.kind, f, r)
            norm, finite = _apply(opt_g, G, loss, scaler)
    finally:
        D.requires_grad_(True)
    return StepStats(loss.detach(), norm, None, torch.sigmoid(f.detach()).mean(), finite)


def _judge(D: nn.Module, x: Tensor, y: Tensor | None, features: bool) -> tuple[Tensor, Tensor | None]:
    """D's output, and its last hidden layer's features when asked for (through D's forward, so DDP sees the call)."""
    return D(x, y, features=True) if features else (D(x, y), None)


@torch.no_grad()
def ema_update(G_ema: nn.Module, G: nn.Module, decay: float) -> None:
    """G_ema <- decay * G_ema + (1 - decay) * G for parameters; buffers (BN statistics) are copied."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)
