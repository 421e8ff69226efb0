"""Scoring trained generators: image metrics in an evaluator's feature space, or 2-D mode metrics; loading an
autoencoder's encoder and decoder, and picturing its reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gan.autoencoding import reconstruct
from gan.checkpoint import read_checkpoint
from gan.config import Config
from gan.config_loader import from_dict
from gan.data.sources import MODE_SIGMA, mode_centres
from gan.data.transforms import to_model_range, to_points
from gan.metrics.evaluator import Evaluator
from gan.metrics.image_metrics import class_agreement, class_sampler, evaluate_images, latent_sampler
from gan.metrics.modes import ModeStats, mode_stats
from gan.models import build_models
from gan.rendering import class_grid_inputs, generate, save_image_grid, save_scatter

POINT_SAMPLES = 2500  # the sample count of the VEEGAN/PacGAN 2-D tables


def _networks_from_checkpoint(directory: str | Path, slots: dict[str, str]) -> tuple[dict[str, nn.Module], Config,
                                                                                      dict[str, Any]]:
    """The networks `slots` names ({module name in the checkpoint: "G" or "D", the build_models slot it fills}) of a
    checkpoint folder, in eval mode on the CPU, with its config and data facts."""
    state = read_checkpoint(directory)
    extra = state["extra"]
    cfg = from_dict(extra["config"])
    nets = {}
    for name, slot in slots.items():
        G, D = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=tuple(extra["data_shape"]),
                            num_classes=extra["num_classes"])
        net = G if slot == "G" else D
        net.load_state_dict(state["modules"][name])
        nets[name] = net.eval().requires_grad_(False)
    return nets, cfg, extra


def generators_from_checkpoint(directory: str | Path) -> tuple[dict[str, nn.Module], Config, dict[str, Any]]:
    """G and G_ema of a checkpoint folder, in eval mode on the CPU, with its config and data facts."""
    return _networks_from_checkpoint(directory, {"G": "G", "G_ema": "G"})


def discriminator_from_checkpoint(directory: str | Path) -> nn.Module:
    """D of a checkpoint folder, in eval mode on the CPU."""
    return _networks_from_checkpoint(directory, {"D": "D"})[0]["D"]


def autoencoder_from_checkpoint(directory: str | Path) -> tuple[nn.Module, nn.Module, Config, dict[str, Any]]:
    """The encoder (D) and decoder (G) of an autoencoder's checkpoint folder, in eval mode on the CPU, with its config
    and data facts. G, not G_ema: the encoder was trained with G and has no average of its own."""
    nets, cfg, extra = _networks_from_checkpoint(directory, {"G": "G", "D": "D"})
    return nets["D"], nets["G"], cfg, extra


def primary_generator(cfg: Config) -> str:
    """The generator that is scored and registered: G_ema when EMA is on; for the ae family G, the decoder its encoder
    was trained with."""
    return "G_ema" if cfg.optim.ema and cfg.model.family != "ae" else "G"


def score_images(G: nn.Module, cfg: Config, num_classes: int, real_uint8: np.ndarray, evaluator: nn.Module,
                 prefix: str = "eval/") -> dict[str, float]:
    """FID, IS, KID, precision and recall of `eval.num_samples` samples, seeded by `eval.seed`; for a conditional G
    scored by the evaluator, also the share of samples it classifies as the class they were asked for."""
    sample = latent_sampler(G, cfg.model.z_dim, num_classes if cfg.model.conditional else 0)
    metrics = evaluate_images(sample, real_uint8, evaluator, num_samples=cfg.eval.num_samples,
                              batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)
    if cfg.model.conditional and isinstance(evaluator, Evaluator):  # Inception's classes are not the data's
        metrics.update(class_agreement(class_sampler(G, cfg.model.z_dim), evaluator, num_classes=num_classes,
                                       num_samples=cfg.eval.num_samples, shape=tuple(real_uint8.shape[1:]),
                                       batch_size=cfg.eval.batch_size, seed=cfg.eval.seed + 3))
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
    """A PNG of G's samples: a 8x8 grid for images (a conditional G's has a row of 8 per class), a scatter over the
    true modes for 2-D data."""
    if cfg.data.is_points:
        _, points = score_points(G, cfg, extra["scale"])
        return save_scatter(points, path, mode_centres(cfg.data.source), title=cfg.name)
    if cfg.model.conditional:
        z, y = class_grid_inputs(cfg.model.z_dim, range(extra["num_classes"]), 8, cfg.eval.seed)
        return save_image_grid(generate(G, z, y), path, nrow=8)
    z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.eval.seed))
    return save_image_grid(generate(G, z), path, nrow=8)


def save_reconstruction_png(encoder: nn.Module, decoder: nn.Module, x_uint8: np.ndarray, path: str | Path, *,
                            rows: int = 4, columns: int = 8) -> Path:
    """A PNG of the first `rows` x `columns` images of `x_uint8` (whole rows of them), each row followed by its
    reconstructions."""
    columns = max(1, min(columns, len(x_uint8)))
    count = min(len(x_uint8), rows * columns) // columns * columns
    real = to_model_range(torch.as_tensor(x_uint8[:count]))
    pairs = torch.stack([real, reconstruct(encoder, decoder, real)]).unflatten(1, (-1, columns))  # (2, R, cols, C,H,W)
    return save_image_grid(pairs.transpose(0, 1).flatten(0, 2), path, nrow=columns)
