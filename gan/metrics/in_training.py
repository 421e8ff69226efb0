"""In-training score of a checkpoint: FID of N samples in the evaluator's feature space, or the 2-D mode gap."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gan.config import Config
from gan.data import MODE_SIGMA, load_manifest, mode_centres, read_split, to_model_range, to_pixels, to_points
from gan.evaluate import generators_from_checkpoint, primary_generator
from gan.metrics.evaluator import load_evaluator
from gan.metrics.image_metrics import count_tag, extract, fid_from_features, latent_sampler, real_features
from gan.metrics.modes import mode_stats
from gan.samples import generate

UNSCORED = "train/unscored"
"""Set to 1 on a checkpoint reported between scores, whose score key then holds +inf: a checkpoint manager that
ranks by the score (lower is better) must see it as the worst, never as the best."""


def score_key(cfg: Config) -> str:
    """The metric an in-training score reports and a search minimises by default."""
    return "train/mode_gap" if cfg.data.is_points else f"train/fid_{count_tag(cfg.train.fid_samples)}"


class CheckpointScorer:
    """Scores the primary generator (G_ema, or G) of a checkpoint folder; the real side is computed once.

    Images: FID of `train.fid_samples` samples against as many real training images (all of them when there are
    fewer), seeded by `eval.seed` so successive scores differ only by the generator. 2-D data: the mode gap,
    (1 - high-quality share) + reverse KL over modes, 0 for a perfect fit, with its two parts and the modes covered.
    """

    def __init__(self, cfg: Config, dataset_dir: str | Path, evaluator_dir: str | Path | None):
        self.cfg, self.key = cfg, score_key(cfg)
        self.manifest = load_manifest(dataset_dir)
        if not cfg.data.is_points and evaluator_dir is None:
            raise ValueError(f"train.fid_every_kimg={cfg.train.fid_every_kimg:g} on image data needs an evaluator "
                             f"(evaluator_dir)")
        self.evaluator = load_evaluator(evaluator_dir) if not cfg.data.is_points else None
        self._real: torch.Tensor | None = None

    def real(self) -> torch.Tensor:
        if self._real is None:
            x, _ = read_split(self.manifest, "train", verify=False)
            self._real, _ = real_features(x, self.evaluator, num_samples=self.cfg.train.fid_samples,
                                          batch_size=self.cfg.eval.batch_size, seed=self.cfg.eval.seed)
        return self._real

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
