"""The one mapping between stored values (uint8 pixels, 2-D points) and the generator's output range."""

from __future__ import annotations

import numpy as np
import torch


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
