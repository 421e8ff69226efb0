"""The worker side of the Ray Train adapter (with ray_train.py, the only modules importing ray.train): what runs in
each TorchTrainer worker, and in a search trial that trains in its own process: reading the shard, in-training
scores, reports to MLflow and Ray, resuming."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.collective import broadcast_from_rank_zero
from ray.train.torch import get_device, prepare_model

from gan import storage
from gan.checkpoint import override_optimizer_settings
from gan.config import Config
from gan.config_loader import from_dict
from gan.data import decode, load_manifest, to_model_range
from gan.data.batches import epoch_seed, shuffled
from gan.data.labelled import read_labelled_pool
from gan.device import device_layout, prepare_process
from gan.loop import DataSpec, NonFiniteLossError, fit
from gan.metrics.in_training import UNSCORED, CheckpointScorer, RunHealth, ScoreSchedule, score_key
from gan.parallel import ddp_options
from gan.rendering import save_loss_curves
from pipelines import ray_compat
from pipelines.tracking import Tracker

SAMPLE_DIR = "samples"
DIVERGED = "train/diverged_at_kimg"
"""The last report of a run that ended in NonFiniteLossError."""


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs: an MLflow store and a run created by the driver."""

    tracking_uri: str
    run_id: str


class InTrainingScores:
    """In-training scores: rank 0 scores a checkpoint every train.fid_every_kimg (and at the end) and every rank
    gets the numbers, so all report the same keys (with time/score_s, rank 0's seconds spent scoring so far)."""

    def __init__(self, cfg: Config, rank: int, world_size: int, dataset_dir: str, evaluator_dir: str | None, *,
                 device: torch.device | str = "cpu"):
        self.cfg, self.key = cfg, score_key(cfg)
        self.rank, self.world_size = rank, world_size
        self.scorer = CheckpointScorer(cfg, dataset_dir, evaluator_dir, device=device) if rank == 0 else None
        self.schedule = ScoreSchedule(cfg)
        self.seconds = 0.0

    def __call__(self, images: int, checkpoint_dir: str | None) -> dict[str, float]:
        scores: dict[str, float] = {}
        if self.rank == 0 and checkpoint_dir is not None and self.schedule.due(images):
            start = time.perf_counter()
            scores = self.scorer(checkpoint_dir)
            self.seconds += time.perf_counter() - start
        if self.rank == 0:
            scores["time/score_s"] = self.seconds
        return broadcast_from_rank_zero(scores) if self.world_size > 1 else scores


class WorkerReport:
    """Injected as fit's `report`: in-training scores, MLflow from rank 0, then `send` (by default ray.train.report
    with rank 0's checkpoint). `last` holds the metrics of the latest report as sent."""

    def __init__(self, rank: int, tracking: Tracking | None, scores: InTrainingScores | None = None, *,
                 send: Callable[[dict[str, Any], str | None], None] | None = None, progress: bool = True):
        self.rank = rank
        self.tracker = Tracker(tracking.tracking_uri) if tracking and rank == 0 else None
        self.run_id = tracking.run_id if tracking else None
        self.scores = scores
        self.health = RunHealth(scores.cfg) if scores is not None else None
        self.send = send or self.to_train
        self.progress = progress and rank == 0
        self.history: list[dict[str, float]] = []
        self.last: dict[str, Any] = {}

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> bool:
        """Scores, logs and sends one report; True when the run's health says to end training (every rank gets
        the same scores, so every rank decides alike)."""
        images = round(metrics["progress/kimg"] * 1000)
        if self.scores is not None:
            metrics = {**metrics, **self.scores(images, checkpoint_dir)}
        self.last = metrics
        alarm, stop = self.health.observe(metrics) if self.health is not None else (None, False)
        self._flag(metrics["progress/kimg"], alarm, stop)
        if self.progress:
            ray_compat.print_unforwarded(
                f"[train] {metrics['progress/kimg']:8.2f} kimg  {metrics['perf/img_per_s']:8.0f} img/s  "
                + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))  # the family's
                + ("  checkpoint" if checkpoint_dir else ""))
        if self.tracker is not None:
            self.history.append(metrics)
            self.tracker.log_metrics(self.run_id, metrics, step=images)
            if checkpoint_dir is not None:
                self.tracker.log_artifact(self.run_id, Path(checkpoint_dir) / "samples.png", SAMPLE_DIR,
                                          name=f"kimg-{images / 1000:09.3f}.png")
        self.send(metrics, checkpoint_dir)
        return stop

    def monitoring(self) -> contextlib.AbstractContextManager:
        """MLflow's system metrics (CPU, memory, GPU) of this process into the run, from rank 0."""
        return self.tracker.system_metrics(self.run_id) if self.tracker is not None else contextlib.nullcontext()

    def _flag(self, kimg: float, alarm: str | None, stop: bool) -> None:
        """The collapse alarm and an early end, as a progress line and tags on the run (rank 0)."""
        tags = {}
        if alarm is not None:
            tags["collapse"] = f"at {kimg:.2f} kimg: {alarm}"
        if stop:
            tags["ended_early"] = (f"at {kimg:.2f} kimg: " + (f"collapse ({alarm})" if alarm else
                                   f"no better score in train.patience_evals={self.health.train.patience_evals}"))
        for key, text in tags.items():
            if self.progress:
                ray_compat.print_unforwarded(f"[train] {key.replace('_', ' ')} {text}")
            if self.tracker is not None:
                self.tracker.set_tags(self.run_id, {key: text})

    def to_train(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        images = round(metrics["progress/kimg"] * 1000)
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if checkpoint is not None and self.scores is not None and self.scores.key not in metrics:
            # Ray ranks a checkpoint without the score attribute as -inf before applying "min", i.e. as the best,
            # and it would evict the scored ones; +inf makes it the worst (MLflow is not sent the placeholder).
            metrics = {**metrics, self.scores.key: math.inf, UNSCORED: 1.0}
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint-{images:012d}" if checkpoint else None)

    def finish(self) -> None:
        if self.tracker is not None and self.history:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_loss_curves(self.history, Path(tmp) / "loss_curves.png")
                self.tracker.log_artifact(self.run_id, path)


def _batches(cfg: Config, manifest: Any, rank: int, world_size: int):
    """This worker's epochs. The first streams the Ray Data shard; when `data.cache_mb` allows, its rows are kept
    and later epochs reshuffle them in memory instead of re-reading Parquet (every worker caches the same
    number of full batches, so all ranks still take the same number of steps)."""
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.train.batch_size // world_size
    cached: tuple[np.ndarray, np.ndarray | None] | None = None

    def stored(e: int):
        nonlocal cached
        if cached is not None:
            yield from shuffled(*cached, local_batch, epoch_seed(cfg.train.seed, e, rank))
            return
        parts, size = [], 0
        for batch in shard.iter_batches(batch_size=local_batch, batch_format="pyarrow", drop_last=True,
                                        local_shuffle_buffer_size=4 * local_batch,
                                        local_shuffle_seed=cfg.train.seed * 1000 + e):
            x, y = decode(batch.column("x"), batch.column("y"), manifest)
            size += x.nbytes
            if size <= cfg.data.cache_mb * 2**20:
                parts.append((x, y))
            yield x, y
        if parts and size <= cfg.data.cache_mb * 2**20:
            ys = [y for _, y in parts]
            cached = (np.concatenate([x for x, _ in parts]), None if ys[0] is None else np.concatenate(ys))

    return model_batches(stored, manifest.scale)


def model_batches(stored: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray | None]]], scale: float
                  ) -> Callable[[int], Iterator[tuple[torch.Tensor, Any]]]:
    """fit's `batches` from stored values by epoch: tensors in the model range, labels as tensors."""
    def epoch(e: int):
        for x, y in stored(e):
            yield to_model_range(x, scale), (torch.from_numpy(y) if y is not None else None)
    return epoch


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: rebuilds the config, resumes from Ray's checkpoint, trains."""
    cfg = from_dict(loop_config["config"])
    manifest = load_manifest(loop_config["dataset_dir"])
    tracking = Tracking(**loop_config["tracking"]) if loop_config.get("tracking") else None
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    ray_compat.quiet_train_report_log()
    device = get_device()
    autocast_dtype = prepare_process(cfg, device)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        # A checkpoint from elsewhere (a Tune trial's, or PBT's copy of a better trial's): used only when this
        # run has none of its own.
        fs, path = storage.resolve(loop_config["resume_from"])
        checkpoint = Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        resume = local_resume(checkpoint, cfg)
    if rank == 0 and loop_config.get("placement_group_file"):
        storage.write_bytes(loop_config["placement_group_file"], ray_compat.current_placement_group_hex().encode())
    scores = None
    if cfg.train.scores:
        scores = InTrainingScores(cfg, rank, world_size, loop_config["dataset_dir"], loop_config.get("evaluator_dir"),
                                  device=device)
    report = WorkerReport(rank, tracking, scores)
    nodes = _worker_nodes(world_size)
    if report.tracker is not None:  # which node each rank runs on: in the MLflow UI, and what a lost node cost
        report.tracker.set_tags(report.run_id, {"ray.worker_nodes": json.dumps(nodes)})
    try:
        with report.monitoring():
            fit(cfg, _batches(cfg, manifest, rank, world_size), spec=DataSpec.from_manifest(manifest),
                report=report, resume=resume, wrap=model_wrapper(cfg, device, data_parallel=True), device=device,
                rank=rank, world_size=world_size, autocast_dtype=autocast_dtype,
                labelled=read_labelled_pool(manifest, labels=cfg.model.labels, seed=cfg.train.seed, rank=rank)
                if cfg.model.semi_supervised else None)
        report.finish()
    except NonFiniteLossError as err:
        # Final: Train's FailureConfig retries every worker error alike, and a diverged run diverges again from
        # its last checkpoint. Every rank diverges at the same step (DDP averages the gradients), reports it as the
        # run's last result and returns; the driver raises it (ray_train.train, tune_workers.train_on_workers).
        report.finish()
        if rank == 0 and loop_config.get("diverged_file"):  # Train's Result holds only checkpointed reports
            storage.write_bytes(loop_config["diverged_file"], json.dumps([err.kimg, err.patience]).encode())
        ray.train.report({DIVERGED: err.kimg, "train/nonfinite_patience": float(err.patience)})
    finally:
        if resume is not None:
            shutil.rmtree(resume, ignore_errors=True)


def model_wrapper(cfg: Config, device: torch.device, *, data_parallel: bool) -> Callable[[torch.nn.Module],
                                                                                          torch.nn.Module]:
    """fit's `wrap`: the device's layout, and DDP (Ray Train's prepare_model) when data-parallel."""
    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        module = device_layout(module, cfg, device)
        return prepare_model(module, parallel_strategy_kwargs=ddp_options(device.type)) if data_parallel else module
    return wrap


def local_resume(checkpoint: Checkpoint, cfg: Config) -> str:
    """A checkpoint copied into a local temporary folder (the caller removes it), with the config's optimizer
    settings."""
    directory = checkpoint.to_directory(tempfile.mkdtemp(prefix="gan-resume-"))
    # The config's rates and betas win over the checkpoint's: they differ after PBT explores, or when a resumed
    # run is given new ones.
    o = cfg.optim
    override_optimizer_settings(directory, {name: {"lr": lr, "betas": (o.beta1, o.beta2)}
                                            for name, lr in (("opt_g", o.lr_g), ("opt_d", o.lr_d))})
    return directory


def _worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (gathered over the workers' process group)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return nodes
