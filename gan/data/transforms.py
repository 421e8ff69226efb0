"""The one mapping between stored values (uint8 pixels, 2-D points) and the generator's output range."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model_range(x: torch.Tensor | np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """Stored values -> float32 in G's tanh range: uint8 pixels to [-1, 1], points divided by `scale`."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    return x.float() / scale


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """G output in [-1, 1] -> uint8 pixels (the inverse of `to_model_range` for images)."""
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_points(x: torch.Tensor, scale: float) -> torch.Tensor:
    """G output in [-1, 1] -> data coordinates (the inverse of `to_model_range` for points)."""
    return x.detach().float() * scale


def shift_and_zoom(x: torch.Tensor, gen: torch.Generator, *, max_shift: float = 2.0,
                   max_zoom: float = 0.1) -> torch.Tensor:
    """(B, C, H, W) images each shifted by up to `max_shift` pixels and zoomed by up to `max_zoom`, edge pixels
    repeated; the transforms are drawn from `gen` (on the CPU). The evaluator's and the labelled pool's augmentation."""
    if x.dim() != 4:
        raise ValueError(f"shifting and zooming needs images (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, _ = x.shape
    u = torch.rand(b, 3, generator=gen) * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 + max_zoom * u[:, 0]
    theta[:, :, 2] = u[:, 1:] * (2 * max_shift / h)  # grid coordinates span 2 over h pixels
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
