"""Rendering: generator samples as image grids or 2-D scatters over the true modes, and loss curves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.utils import save_image

from gan.data.transforms import to_points


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1000) -> torch.Tensor:
    """G's outputs (model range, on the CPU) for latents `z`, in eval mode, batch by batch."""
    with eval_mode(G):
        device = next(G.parameters()).device
        outs = []
        for i in range(0, z.shape[0], batch_size):
            yb = None if y is None else y[i:i + batch_size].to(device)
            outs.append(G(z[i:i + batch_size].to(device), yb).float().cpu())
        return torch.cat(outs)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Writes a PNG grid of images in [-1, 1] (B, C, H, W)."""
    nrow = nrow or max(1, int(np.ceil(np.sqrt(images.shape[0]))))
    save_image(images, str(path), nrow=nrow, normalize=True, value_range=(-1.0, 1.0), padding=2)
    return Path(path)


def save_scatter(points: np.ndarray, path: str | Path, centres: np.ndarray | None = None,
                 title: str = "") -> Path:
    """Writes a PNG scatter of 2-D samples, with the true mode centres marked when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, label="samples")
    if centres is not None:
        ax.scatter(centres[:, 0], centres[:, 1], s=40, marker="x", c="red", label="modes")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_samples(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None, path: str | Path, *,
                 scale: float = 1.0, centres: np.ndarray | None = None, title: str = "") -> Path:
    """A grid PNG for image generators, a scatter PNG for 2-D ones."""
    out = generate(G, z, y)
    if out.dim() == 2:
        return save_scatter(to_points(out, scale).numpy(), path, centres, title)
    return save_image_grid(out, path)


def save_loss_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Writes a PNG of loss/d, loss/g and D's mean outputs against kimg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kimg = [m["progress/kimg"] for m in history]
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key in ("loss/d", "loss/g"):
        ax_loss.plot(kimg, [m.get(key, float("nan")) for m in history], label=key)
    for key in ("d/real", "d/fake"):
        ax_d.plot(kimg, [m.get(key, float("nan")) for m in history], label=key)
    for ax, title in ((ax_loss, "losses"), (ax_d, "D(x) and D(G(z))")):
        ax.set_xlabel("kimg")
        ax.set_title(title)
        ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
