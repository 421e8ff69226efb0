"""Ray Train adapter, driver side (with ray_train_worker.py, the only modules importing ray.train): the TorchTrainer
of a run (scaling, storage, checkpoint ranking, failures, the Ray Data split) and its outcome, the best checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
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
from ray.train.torch import TorchTrainer

from gan import storage
from gan.config import Config, ConfigError
from gan.config_loader import to_dict
from gan.data import keep_labels, load_manifest, shard_files
from gan.loop import NonFiniteLossError
from gan.metrics.in_training import best_scored, needs_evaluator, score_key
from pipelines import ray_compat
from pipelines.ray_train_worker import Tracking, train_loop_per_worker


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint_dir: str
    """The run's best-scoring checkpoint folder when train.fid_every_kimg is on, else its latest (state.pt,
    meta.json, samples.png): a URI (or absolute path) under the storage root."""
    metrics: dict[str, float]
    """What was reported with that checkpoint."""
    best_metric: float | None = None
    """Its in-training score (metrics[score_key(cfg)]), when scoring is on."""


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
                  placement_group_file: str | None = None, diverged_file: str | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; with train.fid_every_kimg on, Ray keeps the best-scoring checkpoints.
    `storage_path` (a folder or a URI) holds the run's checkpoints and state. `in_memory_data`: see _train_dataset
    (for runs that share the cluster with other runs). `placement_group_file`: rank 0 writes its workers' placement
    group id there (a location under the storage root), for a caller that may have to remove it. `diverged_file`:
    where rank 0 records a NonFiniteLossError instead of raising it (see ray_train_worker.train_loop_per_worker)."""
    manifest = load_manifest(dataset_dir)
    if cfg.train.scores and needs_evaluator(cfg) and evaluator_dir is None:
        raise ConfigError(f"train.fid_every_kimg={cfg.train.fid_every_kimg:g} scores images with the evaluator: "
                          f"pass evaluator_dir")
    resources = {"CPU": cfg.scale.cpus_per_worker, **({"GPU": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {}),
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
                           "resume_from": resume_from, "placement_group_file": placement_group_file,
                           "diverged_file": diverged_file},
        scaling_config=ScalingConfig(num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name or cfg.name, **run_storage(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures), checkpoint_config=keep,
                             callbacks=callbacks, logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": _train_dataset(cfg, manifest, in_memory=in_memory_data)},
    )


def outcome(cfg: Config, result: Result, storage_path: str | Path) -> TrainOutcome:
    """The run's best-scoring checkpoint when scoring is on (its latest otherwise) and what came with it; its
    location as a URI on `storage_path`'s filesystem, which every node can open."""
    if cfg.train.scores:
        key = score_key(cfg)
        found = best_scored(result.best_checkpoints or [], key)
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
    diverged = storage.join(storage_path, f"{run_name or cfg.name}.diverged.json")
    if storage.exists(diverged):  # an earlier attempt's
        storage.delete(diverged)
    trainer = build_trainer(cfg, dataset_dir, storage_path=storage_path, tracking=tracking, max_failures=max_failures,
                            run_name=run_name, evaluator_dir=evaluator_dir, diverged_file=diverged)
    result = trainer.fit()
    if storage.exists(diverged):
        raise NonFiniteLossError(*json.loads(storage.read_bytes(diverged)))
    return outcome(cfg, result, storage_path)
