"""Rendering: generator samples as image grids or 2-D scatters over the true modes, and loss curves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Writes a PNG grid of images (B, C, H, W) in `value_range`, `nrow` to a row (default: a square grid)."""
    nrow = nrow or max(1, int(np.ceil(np.sqrt(images.shape[0]))))
    save_image(images, str(path), nrow=nrow, normalize=True, value_range=value_range, padding=2)
    return Path(path)


def class_grid_inputs(z_dim: int, classes: Sequence[int], per_class: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and labels of a grid with one row per class (`per_class` images, in the order of `classes`): column
    j has the same latent in every row, so a column shows one style drawn as each class."""
    if per_class < 1 or not classes:
        raise ValueError(f"a class grid needs classes and per_class >= 1, got {list(classes)} and {per_class}")
    z = torch.randn(per_class, z_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.as_tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)
    return z.repeat(len(classes), 1), y


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
    """Writes a PNG of every loss/* series (loss/d and loss/g for a GAN; loss/vae, loss/reconstruction and loss/kl
    for a VAE, ...) and, for a GAN, D's mean outputs, against kimg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kimg = [m["progress/kimg"] for m in history]
    losses = sorted({key for m in history for key in m if key.startswith("loss/")})
    d_keys = [key for key in ("d/real", "d/fake") if any(key in m for m in history)]
    fig, axes = plt.subplots(1, 2 if d_keys else 1, figsize=(10 if d_keys else 5, 4), dpi=100, squeeze=False)
    panels = [(axes[0][0], losses, "losses")] + ([(axes[0][1], d_keys, "D(x) and D(G(z))")] if d_keys else [])
    for ax, keys, title in panels:
        for key in keys:
            ax.plot(kimg, [m.get(key, float("nan")) for m in history], label=key)
        ax.set_xlabel("kimg")
        ax.set_title(title)
        ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
