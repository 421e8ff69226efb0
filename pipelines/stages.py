"""The pipeline's stages as plain functions with small outputs (paths, hashes, metrics), one MLflow run each."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gan.config import Config, config_hash, flatten
from gan.data import load_manifest, prepare, read_split
from gan.evaluate import (
    discriminator_from_checkpoint,
    generators_from_checkpoint,
    primary_generator,
    save_sample_png,
    score_images,
    score_points,
)
from gan.metrics import evaluator_meta, load_evaluator, load_inception, real_floor, save_evaluator, train_evaluator
from gan.metrics.semi_supervised import semi_supervised_metrics
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


def evaluator_stage(ctx: Context, cfg: Config, dataset: dict[str, Any]) -> dict[str, Any]:
    """Trains the feature network of FID/IS/KID on the real training split, records its test accuracy, id and
    the real-vs-real floor; reused without retraining while the data and the evaluator settings are unchanged."""
    manifest = load_manifest(dataset["dataset_dir"])
    if manifest.kind == "points":
        ctx.log("[evaluator] 2-D data: scored by mode metrics, no evaluator needed")
        return {"evaluator_dir": None}
    key = hashlib.sha256(json.dumps([manifest.dataset_hash, cfg.eval.evaluator_epochs, cfg.eval.seed,
                                     cfg.eval.num_samples]).encode()).hexdigest()[:12]
    directory = Path(dataset["dataset_dir"]).parent / "evaluators" / f"{manifest.dataset_id}-{key}"

    def body(run_id: str) -> dict[str, Any]:
        reused = (directory / "evaluator.json").is_file()
        if not reused:
            _train_evaluator(cfg, manifest, directory)
        info = evaluator_meta(directory)
        ctx.tracker.log_metrics(run_id, info["meta"]["metrics"], step=0)
        ctx.tracker.set_tags(run_id, {"evaluator_id": info["evaluator_id"], "reused": str(reused),
                                      "dataset_hash": manifest.dataset_hash})
        ctx.log(f"[evaluator] {'reused' if reused else 'trained'} {info['evaluator_id']}: "
                f"{json.dumps({k: round(v, 4) for k, v in info['meta']['metrics'].items()})}")
        return {"evaluator_dir": str(directory), "evaluator_id": info["evaluator_id"],
                "floor": info["meta"]["metrics"]}
    return run_stage(ctx, "evaluator", body, tags={"dataset_hash": manifest.dataset_hash})


def _train_evaluator(cfg: Config, manifest: Any, directory: Path) -> None:
    x_train, y_train = read_split(manifest, "train")
    x_test, y_test = read_split(manifest, "test")
    model, acc = train_evaluator(x_train, y_train, x_test, y_test, epochs=cfg.eval.evaluator_epochs,
                                 seed=cfg.eval.seed)
    n = min(cfg.eval.num_samples, len(x_train), len(x_test))
    metrics = {"evaluator/test_accuracy": acc, **real_floor(x_train, x_test, model, num_samples=n,
                                                             batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)}
    # Written beside and renamed into place, so an interrupted run leaves no half-saved evaluator.
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    save_evaluator(model, tmp, meta={"metrics": metrics, "dataset_hash": manifest.dataset_hash})
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run saved the same evaluator first


def evaluate_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                   trained: dict[str, Any]) -> dict[str, Any]:
    """Scores G_ema (eval/...) and G (eval_raw/...) from the trained checkpoint; logs a sample PNG."""
    def body(run_id: str) -> dict[str, Any]:
        gens, _, extra = generators_from_checkpoint(trained["checkpoint_dir"])
        primary = primary_generator(cfg)
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        images = evaluator["evaluator_dir"] is not None
        if images:
            x_train, y_train = read_split(dataset["dataset_dir"], "train", verify=False)
            net = load_evaluator(evaluator["evaluator_dir"])
            sized = replace(cfg, eval=replace(cfg.eval, num_samples=min(cfg.eval.num_samples, len(x_train))))
        for name, G in gens.items():
            prefix = "eval/" if name == primary else "eval_raw/"
            if not images:
                metrics.update(score_points(G, cfg, extra["scale"], prefix)[0])
                continue
            metrics.update(score_images(G, sized, extra["num_classes"], x_train, net, prefix))
            if cfg.eval.inception_weights and name == primary:
                # Inception features on top of the evaluator's, for numbers comparable with the literature.
                inception = score_images(G, sized, extra["num_classes"], x_train,
                                         load_inception(cfg.eval.inception_weights), "eval/inception_")
                metrics.update({k: v for k, v in inception.items() if "/inception_fid" in k or "_is_" in k})
        if cfg.model.semi_supervised:
            x_test, y_test = read_split(dataset["dataset_dir"], "test", verify=False)
            metrics.update(semi_supervised_metrics(discriminator_from_checkpoint(trained["checkpoint_dir"]),
                                                   x_train, y_train, x_test, y_test, labels=cfg.model.labels,
                                                   seed=cfg.train.seed))
        metrics["perf/eval_seconds"] = time.perf_counter() - start
        metrics.update(evaluator.get("floor") or {})
        ctx.tracker.log_metrics(run_id, metrics, step=0)
        tags = {"evaluator_id": evaluator.get("evaluator_id", "modes"), "generator": primary,
                "checkpoint": trained["checkpoint_dir"]}
        ctx.tracker.set_tags(run_id, tags)
        with tempfile.TemporaryDirectory() as tmp:
            png = save_sample_png(gens[primary], cfg, extra, Path(tmp) / "samples.png")
            ctx.tracker.log_artifact(run_id, png)
        ctx.log(f"[evaluate] {json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())})}")
        return {"metrics": metrics, **tags}
    return run_stage(ctx, "evaluate", body, tags={"dataset_hash": dataset["dataset_hash"]})
