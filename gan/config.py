"""Typed, frozen run configuration: the sections, their validation, and copies with dotted keys set
(YAML, overrides and flattening: gan.config_loader)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from gan.config_checks import ConfigError as ConfigError  # re-exported: the error a config user catches
from gan.config_checks import check as _check
from gan.config_checks import leaf_types
from gan.config_model import AUTOENCODER_FAMILIES as AUTOENCODER_FAMILIES  # re-exported with the sections below
from gan.config_model import DIFFAUGMENT_POLICIES as DIFFAUGMENT_POLICIES
from gan.config_model import IMAGE_RESOLUTIONS as IMAGE_RESOLUTIONS
from gan.config_model import LIKELIHOODS as LIKELIHOODS
from gan.config_model import LOSSES as LOSSES
from gan.config_model import MODEL_FAMILIES as MODEL_FAMILIES
from gan.config_model import LossConfig as LossConfig
from gan.config_model import ModelConfig as ModelConfig
from gan.tune_space import SearchConfig, check_space_values, parse_space

POINT_SOURCES = ("ring8", "grid25")
IMAGE_SOURCES = ("digits", "mnist", "fashion-mnist", "cifar10", "idx", "folder")
SOURCES = POINT_SOURCES + IMAGE_SOURCES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVALUATOR_FEATURES = 128
"""Feature dimension of the trained evaluator (the space of FID, KID and precision/recall)."""
INCEPTION_FEATURES = 2048


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "ring8"
    """Dataset: ring8, grid25 (2-D mixtures), digits (sklearn), mnist, fashion-mnist, cifar10, idx, folder."""
    root: str = ""
    """Folder for idx/folder sources, and the torchvision download/cache root for mnist, fashion-mnist, cifar10."""
    download: bool = False
    """Let torchvision download mnist/fashion-mnist/cifar10 into `root` when they are not there yet."""
    resolution: int = 28
    """Image side in pixels after resizing (digits: 16 or 28; ignored for 2-D sources)."""
    channels: int = 0
    """Image channels to store: 1 or 3; 0 keeps the source's own."""
    num_samples: int = 20000
    """Points drawn for the 2-D sources (train and test together)."""
    test_fraction: float = 0.2
    """Share held out as the test split when the source has no official split."""
    seed: int = 0
    """Seed of the synthetic draws and of the train/test split."""
    shard_rows: int = 4096
    """Rows per Parquet shard."""
    out_dir: str = "data"
    """The folder under the pipeline's storage root (`--storage`) where prepared datasets are written, a
    sub-folder per dataset id; a relative path, so every stage output stays under the one root."""
    cache_mb: int = 1024
    """Ray workers keep their shard in memory after the first epoch when it is at most this many MiB (0: never)."""

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, "data.source", f"must be one of {', '.join(SOURCES)}", self.source)
        _check(self.resolution >= 8, "data.resolution", "must be >= 8", self.resolution)
        _check(self.channels in (0, 1, 3), "data.channels", "must be 0, 1 or 3", self.channels)
        _check(self.num_samples >= 10, "data.num_samples", "must be >= 10", self.num_samples)
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", self.test_fraction)
        _check(self.shard_rows >= 1, "data.shard_rows", "must be >= 1", self.shard_rows)
        _check(self.cache_mb >= 0, "data.cache_mb", "must be >= 0", self.cache_mb)
        _check(bool(self.out_dir), "data.out_dir", "must not be empty", self.out_dir)
        _check(not (self.out_dir.startswith(("/", "~")) or "://" in self.out_dir or ".." in self.out_dir.split("/")),
               "data.out_dir", "must be a relative folder without '..' (it goes under the storage root, --storage)",
               self.out_dir)
        if self.source in ("idx", "folder"):
            _check(bool(self.root), "data.root", f"must name a folder for source {self.source}", self.root)
        if self.source == "digits":
            _check(self.resolution in (8, 16, 28), "data.resolution", "must be 8, 16 or 28 for digits",
                   self.resolution)

    @property
    def is_points(self) -> bool:
        return self.source in POINT_SOURCES


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr_g: float = 2e-4
    """Adam learning rate of G (ae/vae: of the decoder)."""
    lr_d: float = 2e-4
    """Adam learning rate of D (ae/vae: of the encoder; equal rates make the two one Adam over both)."""
    beta1: float = 0.5
    """Adam beta1 (0.5 is the DCGAN choice; 0.0 for wgan-gp)."""
    beta2: float = 0.999
    """Adam beta2."""
    ema: bool = True
    """Keep an exponential moving average of G's weights (G_ema)."""
    ema_decay: float = 0.999
    """Decay of G_ema per G step (ramped up from 0.1 over the first steps: min(decay, (1+t)/(10+t)))."""
    lr_decay_from: float = 1.0
    """Fraction of train.kimg after which both learning rates fall linearly to 0 at the end; 1.0 keeps them
    constant. A quieter G in the last steps tightens its modes (grid25 preset: 0.5)."""

    def __post_init__(self) -> None:
        _check(self.lr_g > 0, "optim.lr_g", "must be > 0", self.lr_g)
        _check(self.lr_d > 0, "optim.lr_d", "must be > 0", self.lr_d)
        _check(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)", self.beta2)
        _check(0 < self.ema_decay < 1, "optim.ema_decay", "must be in (0, 1)", self.ema_decay)
        _check(0 <= self.lr_decay_from <= 1, "optim.lr_decay_from", "must be in [0, 1]", self.lr_decay_from)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 64
    """Global batch size; each of N workers takes batch_size // N."""
    kimg: float = 10.0
    """Training length in thousands of real images shown to D."""
    seed: int = 0
    """Seed of weights, latents and data order."""
    log_every_kimg: float = 1.0
    """Report metrics every this many kimg."""
    checkpoint_every_kimg: float = 5.0
    """Save a full checkpoint every this many kimg (and at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    nonfinite_patience: int = 5
    """Stop with an error after this many non-finite losses in a row (each such step is skipped)."""
    sample_grid: int = 64
    """Fixed latents rendered in each sample grid."""
    fid_every_kimg: float = 0.0
    """In-training score every this many kimg and at the end (0: off): FID of `fid_samples` samples in the evaluator's
    space (train/fid_2k), for 2-D data the mode gap, for the ae family the reconstruction error of `fid_samples`
    training images (train/reconstruction_error); a whole multiple of checkpoint_every_kimg, as it scores the
    checkpoint. With it on, the run's result is its best-scoring checkpoint, not its last."""
    fid_samples: int = 2000
    """Generated samples per in-training score (at least 2,000: fewer gives a biased, noisy FID)."""
    patience_evals: int = 0
    """End the run once its in-training score has not improved for this many scores in a row (0: off); its result
    stays the best-scoring checkpoint. Needs train.fid_every_kimg."""
    collapse_class_share: float = 0.5
    """Collapse alarm (images): a tag `collapse` on the run and a progress line when the evaluator puts at least this
    share of the scored samples in one class, or the scored samples' recall falls below half its best (0: off)."""
    stop_on_collapse: bool = False
    """End the run at the collapse alarm (its result stays the best-scoring checkpoint)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(self.kimg > 0, "train.kimg", "must be > 0", self.kimg)
        _check(self.log_every_kimg > 0, "train.log_every_kimg", "must be > 0", self.log_every_kimg)
        _check(self.checkpoint_every_kimg > 0, "train.checkpoint_every_kimg", "must be > 0",
               self.checkpoint_every_kimg)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(self.nonfinite_patience >= 1, "train.nonfinite_patience", "must be >= 1",
               self.nonfinite_patience)
        _check(self.sample_grid >= 1, "train.sample_grid", "must be >= 1", self.sample_grid)
        _check(self.fid_every_kimg >= 0, "train.fid_every_kimg", "must be >= 0", self.fid_every_kimg)
        _check(self.patience_evals >= 0, "train.patience_evals", "must be >= 0", self.patience_evals)
        _check(self.patience_evals == 0 or self.fid_every_kimg > 0, "train.patience_evals",
               "needs train.fid_every_kimg > 0 (it counts in-training scores)", self.patience_evals)
        _check(0 <= self.collapse_class_share <= 1, "train.collapse_class_share", "must be in [0, 1]",
               self.collapse_class_share)
        if self.fid_every_kimg > 0:
            _check(self.fid_samples >= 2000, "train.fid_samples", "must be >= 2000", self.fid_samples)
            every, ckpt = round(self.fid_every_kimg * 1000), round(self.checkpoint_every_kimg * 1000)
            _check(every % ckpt == 0, "train.fid_every_kimg",
                   f"must be a whole multiple of train.checkpoint_every_kimg={self.checkpoint_every_kimg:g}",
                   self.fid_every_kimg)

    @property
    def scores(self) -> bool:
        """Whether the in-training score is on."""
        return self.fid_every_kimg > 0


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    num_samples: int = 10000
    """Generated and real samples per metric (named in the metric key, e.g. eval/fid_10k)."""
    batch_size: int = 500
    """Batch size of evaluation forward passes."""
    seed: int = 1234
    """Seed of the evaluation latents, so the same model gives the same numbers."""
    inception_weights: str = ""
    """Local Inception-v3 weights file; empty uses the trained evaluator."""
    evaluator_epochs: int = 10
    """Epochs of the evaluator classifier trained on the real training split."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 2, "eval.num_samples", "must be >= 2", self.num_samples)
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _check(self.evaluator_epochs >= 1, "eval.evaluator_epochs", "must be >= 1", self.evaluator_epochs)


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    num_workers: int = 1
    """Ray Train workers (data-parallel replicas). In a search, 1 trains each trial inside its Tune trial process
    (no TorchTrainer per trial), as many at once as the cluster's CPUs (or GPUs) hold."""
    use_gpu: bool = False
    """Train on GPUs: scale.gpus_per_worker each."""
    gpus_per_worker: float = 1.0
    """GPUs each worker reserves with scale.use_gpu; a fraction lets several small trials share one GPU."""
    precision: str = "auto"
    """Precision of the training steps: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 (autocast, also on CPU), or
    fp16 (autocast with a gradient scaler per optimizer, saved in the checkpoint)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (fractions allowed)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also reserves, e.g. {trainer_node: 1} to place workers on the nodes that
    declare that resource (`ray start --resources`), one per node when each node declares 1."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scale.num_workers", "must be >= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, "scale.cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _check(self.gpus_per_worker > 0, "scale.gpus_per_worker", "must be > 0", self.gpus_per_worker)
        _check(self.precision in PRECISIONS, "scale.precision", f"must be one of {', '.join(PRECISIONS)}",
               self.precision)
        for name, amount in self.worker_resources.items():
            key = f"scale.worker_resources.{name}"
            _check(name not in ("CPU", "GPU"), key, "must be a custom resource (CPU and GPU have their own keys)",
                   amount)
            _check(isinstance(amount, (int, float)) and not isinstance(amount, bool) and 0 < amount < math.inf,
                   key, "must be a finite number > 0", amount)

    def __hash__(self) -> int:  # the dataclass hash would fail on the worker_resources dict
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass(frozen=True, kw_only=True)
class RegisterConfig:
    model_name: str = ""
    """Registered model name; empty means gan-<data.source>-<resolution>px (gan-<data.source> for 2-D data; with
    -conditional appended for a generator that takes labels), and ae-<data.source>-<resolution>px for the ae family.
    A semi-supervised GAN's classifier is registered as classifier-<data.source>-<resolution>px (this name with
    -classifier appended when set). A name holds one kind of model (generator, autoencoder, classifier) and one data
    shape: registering another under it is refused."""
    max_fid: float = 0.0
    """Refuse to register a generator whose score (FID; the mode gap for 2-D data) exceeds this (0 disables the
    gate; autoencoders and classifiers are not gated)."""
    auto_champion: bool = True
    """Move the `champion` alias to a better version at registration. False leaves it where a person put it (so
    does the tag pinned=true on the champion version); the first version still becomes champion."""

    def __post_init__(self) -> None:
        _check(self.max_fid >= 0, "register.max_fid", "must be >= 0", self.max_fid)


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "gan"
    """Run name; a re-run with the same name resumes."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tune: SearchConfig = field(default_factory=SearchConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty", self.name)
        workers = self.scale.num_workers
        _check(self.train.batch_size % workers == 0, "train.batch_size",
               f"must be divisible by scale.num_workers={workers}", self.train.batch_size)
        _check(self.train.batch_size // workers % self.model.pack == 0, "train.batch_size",
               f"per worker (/ scale.num_workers={workers}) must be a multiple of model.pack={self.model.pack}",
               self.train.batch_size)
        sides = IMAGE_RESOLUTIONS.get(self.model.family)
        if sides is not None:
            _check(not self.data.is_points, "model.family", f"{self.model.family} needs image data, not 2-D points",
                   self.model.family)
            _check(self.data.resolution in sides, "data.resolution",
                   f"must be one of {sides} for {self.model.family}", self.data.resolution)
        if self.model.family in AUTOENCODER_FAMILIES:
            self._check_autoencoder()
        if self.model.conditional or self.model.semi_supervised:
            _check(not self.data.is_points, "model.conditional", "needs labelled image data",
                   self.data.source)
        _check(not (self.model.diffaugment and self.data.is_points), "model.diffaugment", "augments images, not "
               "2-D points", self.model.diffaugment)
        if not self.data.is_points:
            # Fewer samples than feature dimensions leave FID's covariance singular: the number means nothing.
            features = INCEPTION_FEATURES if self.eval.inception_weights else EVALUATOR_FEATURES
            _check(self.eval.num_samples >= features, "eval.num_samples",
                   f"must be >= the feature dimension {features} for a meaningful FID", self.eval.num_samples)
        if self.tune.enabled:
            object.__setattr__(self, "tune", dataclasses.replace(self.tune, space=parse_space(self.tune.space,
                                                                                              _leaf_types())))
            check_space_values(self)
            self._check_searched_families()

    def _check_autoencoder(self) -> None:
        """An autoencoder trains on its likelihood: the adversarial loss's settings are refused, not ignored."""
        family = self.model.family
        _check(not self.data.is_points, "model.family", f"{family} is built for images, not 2-D points", family)
        _check(self.loss.kind == "bce", "loss.kind", f"is the adversarial loss; {family} trains on its likelihood "
               "(model.likelihood), leave loss.kind at bce", self.loss.kind)
        for key, off in {"n_critic": 1, "r1_gamma": 0.0, "r2_gamma": 0.0, "feature_matching": False}.items():
            value = getattr(self.loss, key, off)
            _check(value == off, f"loss.{key}", f"is a GAN setting; the {family} family needs {off!r}", value)

    def _check_searched_families(self) -> None:
        """A search ranks its trials by one in-training score: the ae family's is a reconstruction error, the
        generators' a FID, so ae does not share a search with them."""
        spec = self.tune.space.get("model.family")
        if spec is None:
            return
        families = set(spec.get("choice", [])) | ({self.model.family} if "when" in spec else set())
        _check("ae" not in families or len(families) == 1, "tune.space.model.family", "cannot mix ae with "
               "generator families (trials are ranked by one score: ae's reconstruction error is not a FID)",
               sorted(families))


@functools.cache
def _leaf_types() -> dict[str, Any]:
    return leaf_types(Config)
