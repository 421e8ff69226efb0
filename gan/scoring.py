"""Scoring trained generators: image metrics in an evaluator's feature space, or 2-D mode metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gan.checkpoint import read_checkpoint
from gan.config import Config
from gan.config_loader import from_dict
from gan.data.sources import MODE_SIGMA, mode_centres
from gan.data.transforms import to_points
from gan.metrics.image_metrics import evaluate_images, latent_sampler
from gan.metrics.modes import ModeStats, mode_stats
from gan.models import build_models
from gan.rendering import generate, save_image_grid, save_scatter

POINT_SAMPLES = 2500  # the sample count of the VEEGAN/PacGAN 2-D tables


def generators_from_checkpoint(directory: str | Path) -> tuple[dict[str, nn.Module], Config, dict[str, Any]]:
    """G and G_ema of a checkpoint folder, in eval mode on the CPU, with its config and data facts."""
    state = read_checkpoint(directory)
    extra = state["extra"]
    cfg = from_dict(extra["config"])
    gens = {}
    for name in ("G", "G_ema"):
        G, _ = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=tuple(extra["data_shape"]),
                            num_classes=extra["num_classes"])
        G.load_state_dict(state["modules"][name])
        gens[name] = G.eval().requires_grad_(False)
    return gens, cfg, extra


def discriminator_from_checkpoint(directory: str | Path) -> nn.Module:
    """D of a checkpoint folder, in eval mode on the CPU."""
    state = read_checkpoint(directory)
    extra = state["extra"]
    cfg = from_dict(extra["config"])
    _, D = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=tuple(extra["data_shape"]),
                        num_classes=extra["num_classes"])
    D.load_state_dict(state["modules"]["D"])
    return D.eval().requires_grad_(False)


def primary_generator(cfg: Config) -> str:
    """The generator that is scored and registered: G_ema when EMA is on."""
    return "G_ema" if cfg.optim.ema else "G"


def score_images(G: nn.Module, cfg: Config, num_classes: int, real_uint8: np.ndarray, evaluator: nn.Module,
                 prefix: str = "eval/") -> dict[str, float]:
    """FID, IS, KID, precision and recall of `eval.num_samples` samples, seeded by `eval.seed`."""
    sample = latent_sampler(G, cfg.model.z_dim, num_classes if cfg.model.conditional else 0)
    metrics = evaluate_images(sample, real_uint8, evaluator, num_samples=cfg.eval.num_samples,
                              batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
    return {prefix + k.removeprefix("eval/"): v for k, v in metrics.items()}


def point_stats(G: nn.Module, cfg: Config, scale: float, n: int) -> tuple[ModeStats, np.ndarray]:
    """The mode statistics of `n` samples from latents seeded by `eval.seed`, and the samples (data units)."""
    z = torch.randn(n, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.eval.seed))
    points = to_points(generate(G, z), scale).numpy()
    return mode_stats(points, mode_centres(cfg.data.source), MODE_SIGMA[cfg.data.source]), points


def score_points(G: nn.Module, cfg: Config, scale: float, prefix: str = "eval/") -> tuple[dict[str, float], np.ndarray]:
    """Modes covered, high-quality share, reverse KL and the mode gap over 2,500 samples, and the samples."""
    stats, points = point_stats(G, cfg, scale, POINT_SAMPLES)
    return stats.as_metrics(prefix), points


def save_sample_png(G: nn.Module, cfg: Config, extra: dict[str, Any], path: str | Path) -> Path:
    """A PNG of G's samples: a 8x8 grid for images, a scatter over the true modes for 2-D data."""
    if cfg.data.is_points:
        _, points = score_points(G, cfg, extra["scale"])
        return save_scatter(points, path, mode_centres(cfg.data.source), title=cfg.name)
    z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.eval.seed))
    num_classes = extra["num_classes"] if cfg.model.conditional else 0
    y = torch.arange(64) % num_classes if num_classes else None
    return save_image_grid(generate(G, z, y), path, nrow=8)
