"""DiffAugment (Zhao et al. 2020): random translation, cutout and colour, differentiable, applied to every image D
sees (real and fake, in the D and G steps and in the penalties' inputs), so D cannot memorise a small dataset."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

TRANSLATION_RATIO = 0.125
"""Largest shift as a share of the image side (the paper's 1/8)."""
CUTOUT_RATIO = 0.5
"""Side of the cut-out square as a share of the image side (the paper's 1/2)."""


def translation(x: Tensor) -> Tensor:
    """Each image shifted by up to TRANSLATION_RATIO of its side in x and y, whole pixels, zeros (mid-grey of
    [-1, 1] is 0) coming in at the edges."""
    b, _, h, w = x.shape
    shift = torch.randint(-int(h * TRANSLATION_RATIO), int(h * TRANSLATION_RATIO) + 1, (b, 2), device=x.device)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 0].to(x.dtype) / w  # grid coordinates span 2 over the side
    theta[:, 1, 2] = -2 * shift[:, 1].to(x.dtype) / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: Tensor) -> Tensor:
    """A square of CUTOUT_RATIO of the side, at a random place in each image, set to 0 (it may hang over an edge)."""
    b, _, h, w = x.shape
    size = max(1, int(h * CUTOUT_RATIO))
    centre = torch.stack([torch.randint(0, h, (b,), device=x.device), torch.randint(0, w, (b,), device=x.device)], 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - centre[:, 0].view(b, 1, 1)).abs() <= size // 2) & (
        (cols - centre[:, 1].view(b, 1, 1)).abs() <= size // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: Tensor) -> Tensor:
    """Random brightness (+-0.5), saturation (x 0..2, colour images) and contrast (x 0.5..1.5), kept in [-1, 1]."""
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean
    return x.clamp(-1, 1)


OPS: dict[str, Callable[[Tensor], Tensor]] = {"translation": translation, "cutout": cutout, "color": color}


def diff_augment(policies: str) -> Callable[[Tensor], Tensor] | None:
    """The augmentation of `model.diffaugment` ("color,translation,cutout", applied in the paper's order: colour,
    translation, cutout), None when empty."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        return None
    ordered = [OPS[name] for name in ("color", "translation", "cutout") if name in names]

    def augment(x: Tensor) -> Tensor:
        for op in ordered:
            x = op(x)
        return x
    return augment
