"""The training loop: fit(cfg, batches, ...) counts images, skips non-finite steps, reports and checkpoints
through injected callables, so the same loop runs in-process, under Ray Train or under Ray Tune."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from gan.augment import diff_augment
from gan.autoencoding import AutoencoderStats, autoencoder_step
from gan.checkpoint import load_checkpoint, save_checkpoint, unwrap
from gan.config import AUTOENCODER_FAMILIES, Config, OptimConfig
from gan.config_loader import to_dict
from gan.data.labelled import LabelledPool
from gan.data.reader import Manifest
from gan.data.sources import mode_centres
from gan.data.transforms import to_pixels
from gan.models import build_models
from gan.rendering import save_samples
from gan.scoring import save_reconstruction_png
from gan.step import Augment, StepStats, d_step, ema_update, g_step

T = TypeVar("T")
Batch = tuple[Tensor, Tensor | None]
Batches = Callable[[int], Iterable[Batch]]
"""epoch -> that epoch's local batches (x in the model range, labels or None), the same every call."""
Report = Callable[[dict[str, float], str | None], bool | None]
"""(metrics, checkpoint folder or None) -> True to end training here (e.g. the score stopped improving), else None;
the folder is deleted once report returns. Under data parallelism every rank must return the same."""


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients for `train.nonfinite_patience` steps in a row."""

    def __init__(self, kimg: float, patience: int):
        super().__init__(f"non-finite loss or gradient in {patience} steps in a row at {kimg:.3f} kimg "
                         f"(train.nonfinite_patience={patience}); try lower optim.lr_g / optim.lr_d or another "
                         f"loss.kind")
        self.kimg, self.patience = kimg, patience

    def __reduce__(self):  # pickled across Ray processes with its arguments
        return type(self), (self.kimg, self.patience)


@dataclass(frozen=True)
class DataSpec:
    """What the networks need to know about the data: example shape, class count, point scale, modes."""

    shape: tuple[int, ...]
    num_classes: int = 0
    scale: float = 1.0
    centres: np.ndarray | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> DataSpec:
        centres = mode_centres(manifest.source) if manifest.kind == "points" else None
        return cls(tuple(manifest.shape), manifest.num_classes, manifest.scale, centres)


@dataclass
class TrainState:
    """Everything a checkpoint holds; counters are global (all workers together).

    For the autoencoder families (ae, vae) G is the decoder (a generator G(z, y) like the GANs'), D the encoder,
    opt_g and opt_d their optimizers, and each step counts as one D and one G step."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    images: int = 0
    d_steps: int = 0
    g_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    """fp16's gradient scalers ("g", "d"); empty in other precisions."""

    @property
    def kimg(self) -> float:
        return self.images / 1000.0

    def counters(self) -> dict[str, int]:
        return {"images": self.images, "d_steps": self.d_steps, "g_steps": self.g_steps,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


def build_state(cfg: Config, spec: DataSpec, *, device: torch.device | str = "cpu",
                wrap: Callable[[nn.Module], nn.Module] | None = None) -> TrainState:
    """Seeded G, D (wrapped, e.g. in DDP), G_ema and Adam optimizers; identical on every rank."""
    torch.manual_seed(cfg.train.seed)
    G, D = build_models(cfg.model, loss_kind=cfg.loss.kind, data_shape=spec.shape,
                        num_classes=spec.num_classes)
    G, D = G.to(device), D.to(device)
    G_ema = copy.deepcopy(G).requires_grad_(False).eval()
    if wrap is not None:
        G, D = wrap(G), wrap(D)
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    return TrainState(G, D, G_ema, opt_g, opt_d)


def save_state(state: TrainState, directory: str | Path, cfg: Config, spec: DataSpec) -> Path:
    return save_checkpoint(
        directory,
        modules={"G": state.G, "D": state.D, "G_ema": state.G_ema},
        optimizers={"opt_g": state.opt_g, "opt_d": state.opt_d},
        counters=state.counters(),
        extra={"config": to_dict(cfg), "data_shape": list(spec.shape), "num_classes": spec.num_classes,
               "scale": spec.scale, "grad_scalers": {k: v.state_dict() for k, v in state.scalers.items()}},
        meta={"kimg": state.kimg, "name": cfg.name},
    )


def restore_state(state: TrainState, directory: str | Path, *, restore_rng: bool = True) -> None:
    loaded = load_checkpoint(directory, modules={"G": state.G, "D": state.D, "G_ema": state.G_ema},
                             optimizers={"opt_g": state.opt_g, "opt_d": state.opt_d},
                             restore_rng=restore_rng,
                             map_location=next(unwrap(state.G).parameters()).device)
    for key, value in loaded["counters"].items():
        setattr(state, key, int(value))
    for key, scaler_state in loaded["extra"].get("grad_scalers", {}).items():
        if key in state.scalers and scaler_state:
            state.scalers[key].load_state_dict(scaler_state)


class _Window:
    """Sums of step statistics between two reports, kept as tensors until the report."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0

    def add(self, key: str, value: Tensor | None) -> None:
        if value is not None:
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
            self.counts[key] = self.counts.get(key, 0) + 1

    def add_step(self, who: str, stats: StepStats) -> None:
        if not stats.finite:
            self.skipped += 1
            return
        self.add(f"loss/{who}", stats.loss)
        self.add(f"grad_norm/{who}", stats.grad_norm)
        if who == "d":
            self.add("d/real", stats.real_score)
            self.add("d/fake", stats.fake_score)
            self.add("loss/d_supervised", stats.supervised)
        if isinstance(stats, AutoencoderStats):
            for key, value in stats.terms.items():
                self.add(key, value)

    def flush(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        out["train/skipped_steps"] = float(self.skipped)
        self.__init__()
        return out


def _next_multiple(images: int, every_kimg: float) -> int:
    every = max(1, round(every_kimg * 1000))
    return (images // every + 1) * every


def lr_factor(optim: OptimConfig, progress: float) -> float:
    """Multiplier of both learning rates at `progress` (images shown / train.kimg's images): 1 until
    optim.lr_decay_from, then linearly down to 0 at the end."""
    start = optim.lr_decay_from
    if progress <= start or start >= 1:
        return 1.0
    return max(0.0, (1.0 - progress) / (1.0 - start))


def _set_lrs(state: TrainState, optim: OptimConfig, factor: float) -> None:
    # Set from the config, never scaled in place, so a resumed or PBT-mutated run follows the config's rates.
    for opt, lr in ((state.opt_g, optim.lr_g), (state.opt_d, optim.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * factor


def _rng_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Restores the global RNG after a report. Reports may build models or sample (in-training scores); the
    training latents that follow must not depend on that, or a run resumed from the checkpoint (which holds the
    RNG state from before the report) would diverge from the uninterrupted one."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[torch.cuda.current_device() if device.index is None else device.index])


class _Reporter:
    """Builds each report (the window's means, speed, progress, learning rates, where the time went), saves the
    checkpoint and sample grid when one is due (rank 0), and calls `report`."""

    def __init__(self, cfg: Config, spec: DataSpec, state: TrainState, report: Report, *, rank: int,
                 device: torch.device) -> None:
        self.cfg, self.spec, self.state, self.report, self.rank, self.device = cfg, spec, state, report, rank, device
        self.window = _Window()
        fixed = torch.Generator().manual_seed(cfg.train.seed + 12345)
        self.z_fixed = torch.randn(cfg.train.sample_grid, unwrap(state.G).z_dim, generator=fixed)
        self.y_fixed = (torch.arange(cfg.train.sample_grid) % spec.num_classes
                        if cfg.model.conditional and spec.num_classes else None)
        self.t_last, self.images_last = time.perf_counter(), state.images
        # Where this process's time went since its first step (cumulative seconds, reported with every metric):
        # steps (data included), saving checkpoints and sample grids, and inside `report` (before this one).
        self.started, self.spent = self.t_last, {"checkpoint": 0.0, "report": 0.0}
        self.grid_real: Tensor | None = None

    def keep_grid_images(self, real: Tensor) -> None:
        """A plain autoencoder's decoder has no prior to sample from, so its grid shows reconstructions: of the
        first images this process trains on (after a resume, those of its first batch since)."""
        if self.cfg.model.family == "ae" and self.grid_real is None:
            self.grid_real = real[:self.cfg.train.sample_grid].detach().cpu()

    def _timed(self, kind: str, work: Callable[[], T]) -> T:
        t = time.perf_counter()
        try:
            return work()
        finally:
            self.spent[kind] += time.perf_counter() - t

    def _save(self, directory: str) -> None:
        state, cfg = self.state, self.cfg
        save_state(state, directory, cfg, self.spec)
        if self.grid_real is not None:
            with torch.no_grad():
                save_reconstruction_png(unwrap(state.D), unwrap(state.G), to_pixels(self.grid_real),
                                        Path(directory) / "samples.png", rows=max(1, cfg.train.sample_grid // 16))
            return
        save_samples(state.G_ema if cfg.optim.ema else unwrap(state.G), self.z_fixed, self.y_fixed,
                     Path(directory) / "samples.png", scale=self.spec.scale, centres=self.spec.centres,
                     title=f"{cfg.name} @ {state.kimg:.1f} kimg")

    def _metrics(self) -> dict[str, float]:
        state = self.state
        metrics = self.window.flush()
        now = time.perf_counter()
        metrics["time/steps_s"] = now - self.started - self.spent["checkpoint"] - self.spent["report"]
        # Wall time since the previous emit, so time blocked inside report (Ray's) counts against img/s.
        metrics["perf/img_per_s"] = (state.images - self.images_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.images_last = now, state.images
        metrics["progress/kimg"] = state.kimg
        metrics["optim/lr_g"] = state.opt_g.param_groups[0]["lr"]
        metrics["optim/lr_d"] = state.opt_d.param_groups[0]["lr"]
        metrics["progress/epoch"] = float(state.epoch)
        return metrics

    def emit(self, with_checkpoint: bool) -> bool:
        """Reports; True when `report` asks to end training."""
        metrics = self._metrics()
        tmp = tempfile.mkdtemp(prefix="gan-ckpt-") if with_checkpoint and self.rank == 0 else None
        try:
            if tmp is not None:
                self._timed("checkpoint", lambda: self._save(tmp))
            metrics["time/checkpoint_s"], metrics["time/report_s"] = self.spent["checkpoint"], self.spent["report"]
            with _rng_kept(self.device):
                stop = self._timed("report", lambda: self.report(metrics, tmp))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return bool(stop)


def _precision(device: torch.device, autocast_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


def _train_on(state: TrainState, cfg: Config, real: Tensor, y: Tensor | None, *, world_size: int,
              precision: Callable[[], contextlib.AbstractContextManager],
              augment: Augment | None, labelled: LabelledPool | None = None) -> list[tuple[str, StepStats]]:
    """One D step (with a batch of the labelled pool, when given, for a semi-supervised D), and the G step (with the
    EMA update) when one is due; counts the images shown."""
    if cfg.model.family in AUTOENCODER_FAMILIES:
        return _train_autoencoder_on(state, cfg, real, world_size=world_size, precision=precision)
    G, D = state.G, state.D
    z = torch.randn(real.shape[0], unwrap(G).z_dim, device=real.device)
    g_follows = (state.d_steps + 1) % cfg.loss.n_critic == 0
    with precision():
        # When a G step follows, one G forward serves both steps (G is unchanged by the D step).
        fake = G(z, y) if g_follows else None
        lab = (labelled.batch(state.d_steps, real.shape[0], augment=cfg.model.augment_labelled)
               if labelled is not None else None)
        stats = [("d", d_step(G, D, state.opt_d, real, y, z, cfg.loss, fake=fake, scaler=state.scalers.get("d"),
                              augment=augment, labelled=lab, regularize=state.d_steps % cfg.loss.reg_every == 0))]
    state.d_steps += 1
    state.batch_in_epoch += 1
    state.images += real.shape[0] * world_size
    if g_follows:
        with precision():
            g = g_step(G, D, state.opt_g, z, y, cfg.loss, fake=fake, scaler=state.scalers.get("g"), real=real,
                       augment=augment)
        stats.append(("g", g))
        if g.finite:
            state.g_steps += 1
            _update_ema(state, cfg)
    return stats


def _update_ema(state: TrainState, cfg: Config) -> None:
    if cfg.optim.ema:
        # Ramp the decay up so G_ema tracks G from the start instead of the random init.
        decay = min(cfg.optim.ema_decay, (1 + state.g_steps) / (10 + state.g_steps))
        ema_update(state.G_ema, unwrap(state.G), decay)


def _train_autoencoder_on(state: TrainState, cfg: Config, real: Tensor, *, world_size: int,
                          precision: Callable[[], contextlib.AbstractContextManager]) -> list[tuple[str, StepStats]]:
    """One step of an autoencoder family on its likelihood (labels unused); the decoder's EMA follows it."""
    stats = autoencoder_step(state.G, state.D, state.opt_g, state.opt_d, real, cfg.model, precision=precision,
                             scaler=state.scalers.get("g"))
    state.d_steps += 1
    state.batch_in_epoch += 1
    state.images += real.shape[0] * world_size
    if stats.finite:
        state.g_steps += 1
        _update_ema(state, cfg)
    return [(cfg.model.family, stats)]


def _nonfinite_streak(streak: int, stats: list[tuple[str, StepStats]], state: TrainState, cfg: Config) -> int:
    """The count of non-finite steps in a row after this one; raises once it reaches train.nonfinite_patience."""
    streak = 0 if all(s.finite for _, s in stats) else streak + 1
    if streak >= cfg.train.nonfinite_patience:
        raise NonFiniteLossError(state.kimg, cfg.train.nonfinite_patience)
    return streak


def fit(cfg: Config, batches: Batches, *, spec: DataSpec, report: Report, resume: str | Path | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None, device: torch.device | str = "cpu",
        rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None,
        labelled: LabelledPool | None = None) -> TrainState:
    """Trains until `train.kimg` thousand real images (all workers together) have been shown to D, or `report`
    returns True.

    `autocast_dtype` (gan.device.autocast_dtype: bf16 on CUDA by default) runs the steps under mixed precision;
    fp16 adds a gradient scaler per optimizer, saved and restored with the checkpoint. `labelled` (a semi-supervised
    run's pool, gan.data.labelled) gives every D step a labelled batch as large as the local batch.
    """
    if labelled is not None and not cfg.model.semi_supervised:
        raise ValueError("a labelled pool is for model.semi_supervised runs")
    device = torch.device(device)
    labelled = labelled.to(device) if labelled is not None else None
    state = build_state(cfg, spec, device=device, wrap=wrap)
    if autocast_dtype == torch.float16:  # bf16 keeps fp32's exponent range and needs no scaler
        state.scalers = {"g": torch.amp.GradScaler(device.type), "d": torch.amp.GradScaler(device.type)}
    if resume is not None:
        restore_state(state, resume, restore_rng=rank == 0)
    if resume is None or rank != 0:
        # Rank-specific latent streams; rank 0's is restored exactly on resume.
        torch.manual_seed(cfg.train.seed * 100_003 + rank * 7919 + state.images + 1)
    reporter = _Reporter(cfg, spec, state, report, rank=rank, device=device)
    augment = diff_augment(cfg.model.diffaugment)
    target = math.ceil(cfg.train.kimg * 1000)
    next_log = _next_multiple(state.images, cfg.train.log_every_kimg)
    next_ckpt = _next_multiple(state.images, cfg.train.checkpoint_every_kimg)
    streak, stopped = 0, False
    while state.images < target and not stopped:
        got_batch = False
        for index, (real, y) in enumerate(batches(state.epoch)):
            if index < state.batch_in_epoch:
                continue  # resuming mid-epoch: these batches were used before the checkpoint
            got_batch = True
            _set_lrs(state, cfg.optim, lr_factor(cfg.optim, state.images / target))
            real = real.to(device, non_blocking=True)
            reporter.keep_grid_images(real)
            y = None if y is None else y.to(device, non_blocking=True)
            stats = _train_on(state, cfg, real, y, world_size=world_size, augment=augment,
                              precision=lambda: _precision(device, autocast_dtype), labelled=labelled)
            for who, s in stats:
                reporter.window.add_step(who, s)
            streak = _nonfinite_streak(streak, stats, state, cfg)
            done = state.images >= target
            due_ckpt = state.images >= next_ckpt or done
            if state.images >= next_log or due_ckpt:
                stopped = reporter.emit(with_checkpoint=due_ckpt)
                next_log = _next_multiple(state.images, cfg.train.log_every_kimg)
                next_ckpt = _next_multiple(state.images, cfg.train.checkpoint_every_kimg)
            if done or stopped:
                break
        else:
            if not got_batch and state.batch_in_epoch == 0:
                raise ValueError(f"the batch source yielded no batch for epoch {state.epoch}")
            state.epoch += 1
            state.batch_in_epoch = 0
    return state
