"""Ray Train adapter (the only module importing ray.train): gan.loop.fit data-parallel in TorchTrainer workers,
Parquet read through Ray Data, checkpoints (scored in training) reported to Ray, metrics and grids to MLflow."""

from __future__ import annotations

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
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.collective import broadcast_from_rank_zero
from ray.train.torch import TorchTrainer, get_device, prepare_model

from gan import storage
from gan.checkpoint import STATE_FILE
from gan.config import Config, ConfigError
from gan.config_loader import from_dict, to_dict
from gan.data import decode, keep_labels, load_manifest, shard_files, to_model_range
from gan.data.batches import epoch_seed, shuffled
from gan.loop import DataSpec, fit
from gan.metrics.in_training import UNSCORED, CheckpointScorer, ScoreSchedule, score_key
from gan.parallel import ddp_options
from gan.rendering import save_loss_curves
from pipelines import ray_compat
from pipelines.tracking import Tracker

SAMPLE_DIR = "samples"


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs: an MLflow store and a run created by the driver."""

    tracking_uri: str
    run_id: str


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint_dir: str
    """The run's best-scoring checkpoint folder when train.fid_every_kimg is on, else its latest (state.pt,
    meta.json, samples.png): a URI (or absolute path) under the storage root."""
    metrics: dict[str, float]
    """What was reported with that checkpoint."""
    best_metric: float | None = None
    """Its in-training score (metrics[score_key(cfg)]), when scoring is on."""


class InTrainingScores:
    """In-training scores: rank 0 scores a checkpoint every train.fid_every_kimg (and at the end) and every rank
    gets the numbers, so all report the same keys (with time/score_s, rank 0's seconds spent scoring so far)."""

    def __init__(self, cfg: Config, rank: int, world_size: int, dataset_dir: str, evaluator_dir: str | None):
        self.key = score_key(cfg)
        self.rank, self.world_size = rank, world_size
        self.scorer = CheckpointScorer(cfg, dataset_dir, evaluator_dir) if rank == 0 else None
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
        self.send = send or self.to_train
        self.progress = progress and rank == 0
        self.history: list[dict[str, float]] = []
        self.last: dict[str, Any] = {}

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        images = round(metrics["progress/kimg"] * 1000)
        if self.scores is not None:
            metrics = {**metrics, **self.scores(images, checkpoint_dir)}
        self.last = metrics
        if self.progress:
            ray_compat.print_unforwarded(
                f"[train] {metrics['progress/kimg']:8.2f} kimg  {metrics['perf/img_per_s']:8.0f} img/s  "
                f"loss/d {metrics.get('loss/d', float('nan')):.3f}  loss/g {metrics.get('loss/g', float('nan')):.3f}"
                f"{'  checkpoint' if checkpoint_dir else ''}")
        if self.tracker is not None:
            self.history.append(metrics)
            self.tracker.log_metrics(self.run_id, metrics, step=images)
            if checkpoint_dir is not None:
                self.tracker.log_artifact(self.run_id, Path(checkpoint_dir) / "samples.png", SAMPLE_DIR,
                                          name=f"kimg-{images / 1000:09.3f}.png")
        self.send(metrics, checkpoint_dir)

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
    autocast_dtype = precision_for(cfg, device)
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
        scores = InTrainingScores(cfg, rank, world_size, loop_config["dataset_dir"], loop_config.get("evaluator_dir"))
    report = WorkerReport(rank, tracking, scores)
    nodes = _worker_nodes(world_size)
    if report.tracker is not None:  # which node each rank runs on: in the MLflow UI, and what a lost node cost
        report.tracker.set_tags(report.run_id, {"ray.worker_nodes": json.dumps(nodes)})
    try:
        fit(cfg, _batches(cfg, manifest, rank, world_size), spec=DataSpec.from_manifest(manifest),
            report=report, resume=resume, wrap=model_wrapper(cfg, device, data_parallel=True), device=device,
            rank=rank, world_size=world_size,
            autocast_dtype=autocast_dtype)
        report.finish()
    finally:
        if resume is not None:
            shutil.rmtree(resume, ignore_errors=True)


def precision_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Sets this process up for training on `device` and returns the autocast dtype: bf16 on CUDA, none on CPU
    (where torch gets the worker's whole CPUs as threads)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return torch.bfloat16
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    return None


def model_wrapper(cfg: Config, device: torch.device, *, data_parallel: bool) -> Callable[[torch.nn.Module],
                                                                                          torch.nn.Module]:
    """fit's `wrap`: channels-last convolutions on CUDA, and DDP (Ray Train's prepare_model) when data-parallel."""
    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if device.type == "cuda" and cfg.model.family == "dcgan":
            module = module.to(memory_format=torch.channels_last)
        return prepare_model(module, parallel_strategy_kwargs=ddp_options(device.type)) if data_parallel else module
    return wrap


def local_resume(checkpoint: Checkpoint, cfg: Config) -> str:
    """A checkpoint copied into a local temporary folder (the caller removes it), with the config's optimizer
    settings."""
    directory = checkpoint.to_directory(tempfile.mkdtemp(prefix="gan-resume-"))
    _use_config_optim(directory, cfg)
    return directory


def _worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (gathered over the workers' process group)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _use_config_optim(directory: str, cfg: Config) -> None:
    """The config's learning rates and betas win over the checkpoint's (they differ after PBT explores, or when a
    resumed run is given new ones); Adam's moments are kept."""
    path = Path(directory) / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    o = cfg.optim
    for name, lr in (("opt_g", o.lr_g), ("opt_d", o.lr_d)):
        for group in state["optimizers"][name]["param_groups"]:
            group["lr"], group["betas"] = lr, (o.beta1, o.beta2)
    torch.save(state, path)


class ForwardReports(UserCallback):
    """Hands every report (rank 0's metrics and the persisted checkpoint's path) to a Ray queue and waits for the
    consumer's ack, so the checkpoint is not deleted (num_to_keep) before the consumer has copied it. A Tune
    trainable uses it to report Tune checkpoints, which TuneReportCallback does not (it forwards only the path).

    An ack of STOP, or queues that died with their owner, mean the consumer is gone (Tune stopped the trial): the
    run is aborted the way Ctrl+C aborts a driver's, instead of failing its control loop on the dead queues."""

    STOP = "stop"

    def __init__(self, reports: Any, acks: Any):
        self.reports, self.acks = reports, acks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        try:
            self.reports.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint.path if checkpoint else None})
            stop = self.acks.get() == self.STOP
        except ray.exceptions.RayActorError:
            stop = True
        if stop:
            ray_compat.abort_train_run()


def check_resources(cfg: Config, available_cpus: float) -> None:
    """Fails before any worker starts when the workers would leave no CPU for Ray Data's read tasks
    (on a 2-CPU Ray, two 0.75-CPU workers hang forever instead)."""
    needed = cfg.scale.num_workers * cfg.scale.cpus_per_worker
    if needed > available_cpus - ray_compat.RAY_DATA_READ_CPUS:
        raise ConfigError(
            f"scale.num_workers={cfg.scale.num_workers} x scale.cpus_per_worker={cfg.scale.cpus_per_worker} "
            f"reserves {needed:g} of the cluster's {available_cpus:g} CPUs and leaves less than "
            f"{ray_compat.RAY_DATA_READ_CPUS:g} for Ray Data's read tasks; lower scale.cpus_per_worker (fractions are "
            f"fine) or add CPUs")


def _train_dataset(cfg: Config, manifest: Any, *, in_memory: bool = False) -> ray.data.Dataset:
    """The training split as a Ray Dataset; for a semi-supervised GAN only `model.labels` rows keep a label
    (chosen once here, so every worker and every epoch sees the same labelled subset).

    `in_memory` reads the shards here and hands Ray Data the table, so its execution runs no read tasks. Concurrent
    Train runs (a search's trials) need that: Ray Data's autoscaling coordinator splits the CPUs left over by every
    live Train run's reservation evenly among the running datasets, rounded down to whole CPUs, so on 2 CPUs two
    trials' read tasks each get 0 and never run."""
    fs, paths = shard_files(manifest, "train")
    if not cfg.model.semi_supervised and not in_memory:
        return ray.data.read_parquet(paths, filesystem=fs).select_columns(["x", "y"])
    table = pa.concat_tables([pq.read_table(p, columns=["x", "y"], filesystem=fs) for p in paths])
    if cfg.model.semi_supervised:
        y = keep_labels(table.column("y").to_numpy(), cfg.model.labels, cfg.train.seed)
        table = table.set_column(1, "y", pa.array(y))
    return ray.data.from_arrow(table)


def run_storage(storage_path: str | Path) -> dict[str, Any]:
    """RunConfig's storage arguments for a location: a local folder as a path, a URI as a path inside its pyarrow
    filesystem (Ray raises ArrowInvalid for a URI together with a filesystem, and a URI alone drops the query)."""
    if storage.is_local(storage_path):
        return {"storage_path": storage.normalize(storage_path)}
    fs, path = storage.resolve(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def build_trainer(cfg: Config, dataset_dir: str | Path, *, storage_path: str | Path, tracking: Tracking | None = None,
                  max_failures: int = 1, run_name: str | None = None, evaluator_dir: str | Path | None = None,
                  resume_from: str | None = None, callbacks: list[Any] | None = None, in_memory_data: bool = False,
                  placement_group_file: str | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; with train.fid_every_kimg on, Ray keeps the best-scoring checkpoints.
    `storage_path` (a folder or a URI) holds the run's checkpoints and state. `in_memory_data`: see _train_dataset
    (for runs that share the cluster with other runs). `placement_group_file`: rank 0 writes its workers' placement
    group id there (a location under the storage root), for a caller that may have to remove it."""
    manifest = load_manifest(dataset_dir)
    if cfg.train.scores and not cfg.data.is_points and evaluator_dir is None:
        raise ConfigError(f"train.fid_every_kimg={cfg.train.fid_every_kimg:g} scores images with the evaluator: "
                          f"pass evaluator_dir")
    resources = {"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if cfg.scale.use_gpu else {}),
                 **cfg.scale.worker_resources}
    keep = CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)
    if cfg.train.scores:
        keep = CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=score_key(cfg),
                                checkpoint_score_order="min")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "dataset_dir": storage.normalize(dataset_dir),
                           "tracking": tracking.__dict__ if tracking else None,
                           "evaluator_dir": storage.normalize(evaluator_dir) if evaluator_dir else None,
                           "resume_from": resume_from, "placement_group_file": placement_group_file},
        scaling_config=ScalingConfig(num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name or cfg.name, **run_storage(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures), checkpoint_config=keep,
                             callbacks=callbacks, logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": _train_dataset(cfg, manifest, in_memory=in_memory_data)},
    )


def best_scored(checkpoints: list[tuple[Any, dict[str, Any]]] | None, key: str
                ) -> tuple[Any, dict[str, Any]] | None:
    """The (checkpoint, metrics) with the lowest finite `key` (a Ray result's best_checkpoints), None when none has
    one: an unscored checkpoint carries +inf, a diverged score NaN or inf, and neither may win."""
    scored = [(c, m) for c, m in checkpoints or [] if math.isfinite(m.get(key, math.nan))]
    return min(scored, key=lambda cm: cm[1][key]) if scored else None


def outcome(cfg: Config, result: Result, storage_path: str | Path) -> TrainOutcome:
    """The run's best-scoring checkpoint when scoring is on (its latest otherwise) and what came with it; its
    location as a URI on `storage_path`'s filesystem, which every node can open."""
    if cfg.train.scores:
        key = score_key(cfg)
        found = best_scored(result.best_checkpoints, key)
        if found is not None:
            best, metrics = found
            return TrainOutcome(checkpoint_dir=storage.uri_of(storage_path, best.path), metrics=dict(metrics),
                                best_metric=float(metrics[key]))
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name} finished without a checkpoint")
    return TrainOutcome(checkpoint_dir=storage.uri_of(storage_path, result.checkpoint.path),
                        metrics=dict(result.metrics or {}))


def train(cfg: Config, dataset_dir: str | Path, *, storage_path: str | Path, tracking: Tracking | None = None,
          max_failures: int = 1, run_name: str | None = None,
          evaluator_dir: str | Path | None = None) -> TrainOutcome:
    """Data-parallel training on the connected Ray cluster. A re-run with the same `run_name` (default
    `cfg.name`) and storage resumes from that run's latest checkpoint. With train.fid_every_kimg on, rank 0 scores
    checkpoints with the evaluator (`evaluator_dir`; 2-D data needs none) and the outcome is the best one."""
    check_resources(cfg, ray.cluster_resources().get("CPU", 0.0))
    trainer = build_trainer(cfg, dataset_dir, storage_path=storage_path, tracking=tracking, max_failures=max_failures,
                            run_name=run_name, evaluator_dir=evaluator_dir)
    return outcome(cfg, trainer.fit(), storage_path)
