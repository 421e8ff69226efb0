"""In-training score of a checkpoint: FID of N samples in the evaluator's feature space, the 2-D mode gap, or an
autoencoder's reconstruction error."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from gan.autoencoding import RECONSTRUCTION_ERROR, reconstruction_metrics
from gan.config import Config
from gan.data import load_manifest, read_split
from gan.metrics.evaluator import load_evaluator
from gan.metrics.image_metrics import (
    NonFiniteSamplesError,
    count_tag,
    extract,
    fake_batches,
    fid_from_features,
    latent_sampler,
    precision_recall,
    real_features,
)
from gan.metrics.semi_supervised import sgan_accuracy, sgan_accuracy_key
from gan.scoring import (
    autoencoder_from_checkpoint,
    discriminator_from_checkpoint,
    generators_from_checkpoint,
    point_stats,
    primary_generator,
)

T = TypeVar("T")
UNSCORED = "train/unscored"
"""Set to 1 on a checkpoint reported between scores, whose score key then holds +inf: a checkpoint manager that
ranks by the score (lower is better) must see it as the worst, never as the best."""


def score_key(cfg: Config) -> str:
    """The metric an in-training score reports and a search minimises by default."""
    if cfg.model.family == "ae":
        return f"train/{RECONSTRUCTION_ERROR}"
    return "train/mode_gap" if cfg.data.is_points else f"train/fid_{count_tag(cfg.train.fid_samples)}"


def needs_evaluator(cfg: Config) -> bool:
    """Whether the in-training score needs the trained evaluator: the FID of images does; the 2-D mode gap and an
    autoencoder's reconstruction error do not."""
    return not cfg.data.is_points and cfg.model.family != "ae"


def best_scored(checkpoints: list[tuple[T, dict[str, float]]], key: str) -> tuple[T, dict[str, float]] | None:
    """The (checkpoint, metrics) with the lowest finite `key`, None when none has one: an unscored checkpoint
    carries +inf, a diverged score NaN or inf, and neither may win."""
    scored = [(c, m) for c, m in checkpoints if math.isfinite(m.get(key, math.nan))]
    return min(scored, key=lambda cm: cm[1][key]) if scored else None


TOP_CLASS_SHARE = "train/top_class_share"
"""Share of the scored samples that the evaluator puts in their most frequent class (1 / classes when balanced)."""


class RunHealth:
    """Reads each in-training score: the collapse alarm (one class takes at least train.collapse_class_share of the
    samples, or recall falls below half its best so far) and the plateau (no better score for train.patience_evals
    scores in a row). `observe` returns the alarm (or None) and whether training should end."""

    def __init__(self, cfg: Config):
        self.train, self.key = cfg.train, score_key(cfg)
        self.best, self.since_best, self.best_recall = math.inf, 0, 0.0

    def observe(self, metrics: dict[str, float]) -> tuple[str | None, bool]:
        if self.key not in metrics or UNSCORED in metrics:
            return None, False
        score = metrics[self.key]
        if score < self.best:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1
        plateau = 0 < self.train.patience_evals <= self.since_best
        alarm = self._collapse(metrics)
        return alarm, plateau or (alarm is not None and self.train.stop_on_collapse)

    def _collapse(self, metrics: dict[str, float]) -> str | None:
        share = metrics.get(TOP_CLASS_SHARE)
        if share is not None and 0 < self.train.collapse_class_share <= share:
            return f"one class takes {share:.0%} of the samples (train.collapse_class_share=" \
                   f"{self.train.collapse_class_share:g})"
        recall = next((v for k, v in metrics.items() if k.startswith("train/recall_")), None)
        if recall is None:
            return None
        self.best_recall = max(self.best_recall, recall)
        if self.train.collapse_class_share > 0 and recall < 0.5 * self.best_recall:
            return f"recall fell to {recall:.3f}, under half its best {self.best_recall:.3f}"
        return None


class ScoreSchedule:
    """Which checkpoints get an in-training score: the first, then one per `train.fid_every_kimg`, and the last."""

    def __init__(self, cfg: Config):
        self.every = round(cfg.train.fid_every_kimg * 1000)
        self.target = math.ceil(cfg.train.kimg * 1000)
        self.last: int | None = None

    def due(self, images: int) -> bool:
        """Whether the checkpoint at `images` is scored; a due one counts as scored from here on."""
        if self.last is None or images // self.every > self.last // self.every or images >= self.target:
            self.last = images
            return True
        return False


class CheckpointScorer:
    """Scores the primary generator (G_ema, or G) of a checkpoint folder; the real side is computed once.

    Images: FID of `train.fid_samples` samples against as many real training images (all of them when there are
    fewer), seeded by `eval.seed` so successive scores differ only by the generator; a semi-supervised run's K+1 D
    also gets its accuracy on the held-out split (train/sgan_accuracy_<n>_labels: one D forward over it, on the
    CPU). 2-D data: the mode gap,
    (1 - high-quality share) + reverse KL over modes, 0 for a perfect fit, with its two parts and the modes covered.
    The ae family (not a generator): the reconstruction error of `train.fid_samples` training images (the test split
    stays held out for the evaluate stage), by the encoder and decoder G. Sampling and the evaluator's features run
    on `device` (the worker's); the metrics on the features' CPU copies.
    """

    def __init__(self, cfg: Config, dataset_dir: str | Path, evaluator_dir: str | Path | None, *,
                 device: torch.device | str = "cpu"):
        self.cfg, self.key = cfg, score_key(cfg)
        if needs_evaluator(cfg) and evaluator_dir is None:
            raise ValueError(f"train.fid_every_kimg={cfg.train.fid_every_kimg:g} on image data needs an evaluator "
                             f"(evaluator_dir)")
        self.dataset_dir = str(dataset_dir)
        self.evaluator_dir = str(evaluator_dir) if evaluator_dir is not None else None
        self.device = str(torch.device(device))
        self.evaluator = _evaluator(self.evaluator_dir, self.device) if needs_evaluator(cfg) else None

    def real(self) -> torch.Tensor:
        return _real_side(self.dataset_dir, self.evaluator_dir, self.cfg.train.fid_samples, self.cfg.eval.batch_size,
                          self.cfg.eval.seed, self.device)

    def __call__(self, checkpoint_dir: str | Path) -> dict[str, float]:
        scores = self._score(checkpoint_dir)
        if self.cfg.model.semi_supervised:
            x_test, y_test = _test_split(self.dataset_dir)
            scores[sgan_accuracy_key(self.cfg.model.labels, "train/")] = sgan_accuracy(
                discriminator_from_checkpoint(checkpoint_dir), x_test, y_test)
        return scores

    @torch.no_grad()
    def _score(self, checkpoint_dir: str | Path) -> dict[str, float]:
        if self.cfg.model.family == "ae":
            encoder, decoder, _, _ = autoencoder_from_checkpoint(checkpoint_dir)
            x = _training_images(self.dataset_dir, self.cfg.train.fid_samples, self.cfg.eval.seed)
            return reconstruction_metrics(encoder.to(self.device), decoder.to(self.device), x,
                                          batch_size=self.cfg.eval.batch_size, prefix="train/")
        gens, _, extra = generators_from_checkpoint(checkpoint_dir)
        G = gens[primary_generator(self.cfg)].to(self.device)
        n, seed = self.cfg.train.fid_samples, self.cfg.eval.seed
        if self.cfg.data.is_points:
            stats, _ = point_stats(G, self.cfg, extra["scale"], n)
            return stats.as_metrics("train/")  # its train/mode_gap is the score key
        num_classes = extra["num_classes"] if self.cfg.model.conditional else 0
        sample = latent_sampler(G, self.cfg.model.z_dim, num_classes)
        try:
            fake, logits = extract(self.evaluator, fake_batches(sample, n, self.cfg.eval.batch_size, seed + 1,
                                                                tuple(extra["data_shape"])))
        except NonFiniteSamplesError:
            return {self.key: math.inf}
        real = self.real()
        _, recall = precision_recall(real, fake)
        shares = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).float() / len(logits)
        return {self.key: fid_from_features(real, fake), f"train/recall_{count_tag(n)}": recall,
                TOP_CLASS_SHARE: float(shares.max())}


# A process scores many checkpoints, and a Tune trial process many trials, of the same data and evaluator: both are
# immutable once published (their folders are named by content hashes), so they are loaded once per process.
@functools.lru_cache(maxsize=2)
def _evaluator(evaluator_dir: str, device: str) -> torch.nn.Module:
    return load_evaluator(evaluator_dir, map_location=device)


@functools.lru_cache(maxsize=2)
def _test_split(dataset_dir: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_split(load_manifest(dataset_dir), "test", verify=False)
    return x, y


@functools.lru_cache(maxsize=2)
def _real_side(dataset_dir: str, evaluator_dir: str, num_samples: int, batch_size: int, seed: int,
               device: str) -> torch.Tensor:
    x, _ = read_split(load_manifest(dataset_dir), "train", verify=False)
    features, _ = real_features(x, _evaluator(evaluator_dir, device), num_samples=num_samples, batch_size=batch_size,
                                seed=seed)
    return features


@functools.lru_cache(maxsize=2)
def _training_images(dataset_dir: str, num_samples: int, seed: int) -> np.ndarray:
    x, _ = read_split(load_manifest(dataset_dir), "train", verify=False)
    if len(x) <= num_samples:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), num_samples, replace=False))]
