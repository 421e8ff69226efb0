"""In-training score of a checkpoint: FID of N samples in the evaluator's feature space, or the 2-D mode gap."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TypeVar

import torch

from gan.config import Config
from gan.data import MODE_SIGMA, load_manifest, mode_centres, read_split, to_model_range, to_pixels, to_points
from gan.metrics.evaluator import load_evaluator
from gan.metrics.image_metrics import count_tag, extract, fid_from_features, latent_sampler, real_features
from gan.metrics.modes import mode_stats
from gan.rendering import generate
from gan.scoring import generators_from_checkpoint, primary_generator

T = TypeVar("T")
UNSCORED = "train/unscored"
"""Set to 1 on a checkpoint reported between scores, whose score key then holds +inf: a checkpoint manager that
ranks by the score (lower is better) must see it as the worst, never as the best."""


def score_key(cfg: Config) -> str:
    """The metric an in-training score reports and a search minimises by default."""
    return "train/mode_gap" if cfg.data.is_points else f"train/fid_{count_tag(cfg.train.fid_samples)}"


def best_scored(checkpoints: list[tuple[T, dict[str, float]]], key: str) -> tuple[T, dict[str, float]] | None:
    """The (checkpoint, metrics) with the lowest finite `key`, None when none has one: an unscored checkpoint
    carries +inf, a diverged score NaN or inf, and neither may win."""
    scored = [(c, m) for c, m in checkpoints if math.isfinite(m.get(key, math.nan))]
    return min(scored, key=lambda cm: cm[1][key]) if scored else None


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
    fewer), seeded by `eval.seed` so successive scores differ only by the generator. 2-D data: the mode gap,
    (1 - high-quality share) + reverse KL over modes, 0 for a perfect fit, with its two parts and the modes covered.
    """

    def __init__(self, cfg: Config, dataset_dir: str | Path, evaluator_dir: str | Path | None):
        self.cfg, self.key = cfg, score_key(cfg)
        if not cfg.data.is_points and evaluator_dir is None:
            raise ValueError(f"train.fid_every_kimg={cfg.train.fid_every_kimg:g} on image data needs an evaluator "
                             f"(evaluator_dir)")
        self.dataset_dir = str(dataset_dir)
        self.evaluator_dir = str(evaluator_dir) if evaluator_dir is not None else None
        self.evaluator = _evaluator(self.evaluator_dir) if not cfg.data.is_points else None

    def real(self) -> torch.Tensor:
        return _real_side(self.dataset_dir, self.evaluator_dir, self.cfg.train.fid_samples, self.cfg.eval.batch_size,
                          self.cfg.eval.seed)

    @torch.no_grad()
    def __call__(self, checkpoint_dir: str | Path) -> dict[str, float]:
        gens, _, extra = generators_from_checkpoint(checkpoint_dir)
        G = gens[primary_generator(self.cfg)]
        n, seed = self.cfg.train.fid_samples, self.cfg.eval.seed
        if self.cfg.data.is_points:
            z = torch.randn(n, self.cfg.model.z_dim, generator=torch.Generator().manual_seed(seed))
            points = to_points(generate(G, z), extra["scale"]).numpy()
            stats = mode_stats(points, mode_centres(self.cfg.data.source), MODE_SIGMA[self.cfg.data.source])
            gap = (1.0 - stats.high_quality) + stats.reverse_kl
            return {self.key: gap if math.isfinite(gap) else math.inf, **stats.as_metrics("train/")}
        num_classes = extra["num_classes"] if self.cfg.model.conditional else 0
        sample = latent_sampler(G, self.cfg.model.z_dim, num_classes)
        gen, batch = torch.Generator().manual_seed(seed + 1), self.cfg.eval.batch_size
        fakes = []
        for i in range(0, n, batch):
            x = sample(min(batch, n - i), gen)
            if not torch.isfinite(x).all():
                return {self.key: math.inf}
            fakes.append(to_model_range(to_pixels(x)))  # scored as the uint8 pixels they would be saved as
        fake, _ = extract(self.evaluator, fakes)
        return {self.key: fid_from_features(self.real(), fake)}


# A process scores many checkpoints, and a Tune trial process many trials, of the same data and evaluator: both are
# immutable once published (their folders are named by content hashes), so they are loaded once per process.
@functools.lru_cache(maxsize=2)
def _evaluator(evaluator_dir: str) -> torch.nn.Module:
    return load_evaluator(evaluator_dir)


@functools.lru_cache(maxsize=2)
def _real_side(dataset_dir: str, evaluator_dir: str, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    x, _ = read_split(load_manifest(dataset_dir), "train", verify=False)
    features, _ = real_features(x, _evaluator(evaluator_dir), num_samples=num_samples, batch_size=batch_size,
                                seed=seed)
    return features
