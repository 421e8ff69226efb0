"""The pipeline's stages as plain functions with small outputs (paths, hashes, metrics), one MLflow run each."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gan.config import Config, config_hash, flatten
from gan.data import load_manifest, prepare
from pipelines import ray_train
from pipelines.tracking import Tracker


class StageError(RuntimeError):
    """A stage failed; its MLflow run is marked FAILED with the error, and later stages do not run."""


@dataclass(frozen=True)
class Context:
    """What every stage needs: the work folder, the MLflow store and the pipeline's parent run."""

    workdir: Path
    tracker: Tracker
    experiment: str
    parent_run_id: str
    log: Callable[[str], None] = print


def run_stage(ctx: Context, name: str, body: Callable[[str], dict[str, Any]], *,
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `body(run_id)` inside a nested MLflow run; prints start/end lines with durations and the run URL."""
    run_id = ctx.tracker.start_run(ctx.experiment, name, parent_run_id=ctx.parent_run_id,
                                   tags={"stage": name, **(tags or {})})
    if params:
        ctx.tracker.log_params(run_id, params)
    ctx.log(f"[{name}] started  {ctx.tracker.run_url(run_id)}")
    start = time.perf_counter()
    try:
        out = body(run_id)
    except BaseException as err:
        ctx.tracker.end_run(run_id, "FAILED", error=f"{type(err).__name__}: {err}")
        ctx.log(f"[{name}] FAILED after {time.perf_counter() - start:.1f}s: {type(err).__name__}: {err}")
        raise StageError(f"stage {name} failed: {err}") from err
    ctx.tracker.end_run(run_id, "FINISHED")
    ctx.log(f"[{name}] finished in {time.perf_counter() - start:.1f}s")
    return {**out, "run_id": run_id}


def prepare_stage(ctx: Context, cfg: Config) -> dict[str, Any]:
    """Dataset -> Parquet shards + manifest under data.out_dir (reused when already prepared)."""
    def body(run_id: str) -> dict[str, Any]:
        dataset_dir = prepare(cfg.data)
        m = load_manifest(dataset_dir)
        counts = {f"data/{split}_count": float(m.count(split)) for split in m.splits}
        ctx.tracker.log_metrics(run_id, counts, step=0)
        ctx.tracker.set_tags(run_id, {"dataset_id": m.dataset_id, "dataset_hash": m.dataset_hash})
        ctx.log(f"[prepare] {m.dataset_id}: {counts} examples of shape {tuple(m.shape)} -> {dataset_dir}")
        return {"dataset_dir": str(dataset_dir), "dataset_hash": m.dataset_hash, "dataset_id": m.dataset_id}
    return run_stage(ctx, "prepare", body, params={f"data.{k}": v for k, v in flatten(cfg).items()
                                                   if k.startswith("data.")})


def train_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], *, max_failures: int = 1,
                faults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data-parallel training on Ray Train; rank 0 logs metrics and sample grids into this stage's run."""
    def body(run_id: str) -> dict[str, Any]:
        outcome = ray_train.train(cfg, dataset["dataset_dir"], storage_path=ctx.workdir / "ray",
                                  tracking=ray_train.Tracking(ctx.tracker.tracking_uri, run_id),
                                  max_failures=max_failures, faults=faults)
        ctx.tracker.set_tags(run_id, {"checkpoint": outcome.checkpoint_dir})
        return {"checkpoint_dir": outcome.checkpoint_dir, "metrics": outcome.metrics}
    return run_stage(ctx, "train", body, params=flatten(cfg),
                     tags={"dataset_hash": dataset["dataset_hash"], "config_hash": config_hash(cfg)})
