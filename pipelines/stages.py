"""The pipeline's stages as plain functions with small outputs (paths, hashes, metrics), one MLflow run each."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gan import storage
from gan.autoencoding import reconstruction_metrics
from gan.config import Config
from gan.config_loader import config_hash, flatten
from gan.data import load_manifest, prepare, read_split
from gan.device import local_device
from gan.export import ModelRangeView
from gan.metrics import evaluator_meta, load_evaluator, load_inception, real_floor, save_evaluator, train_evaluator
from gan.metrics.evaluator import META_FILE as EVALUATOR_META
from gan.metrics.semi_supervised import semi_supervised_metrics
from gan.scoring import (
    autoencoder_from_checkpoint,
    discriminator_from_checkpoint,
    generators_from_checkpoint,
    primary_generator,
    save_reconstruction_png,
    save_sample_png,
    score_images,
    score_points,
)
from pipelines import ray_train, ray_train_worker
from pipelines.model_registry import heldout_protocol
from pipelines.tracking import Tracker


class StageError(RuntimeError):
    """A stage failed; its MLflow run is marked FAILED with the error, and later stages do not run."""


@dataclass(frozen=True)
class Context:
    """What every stage needs: the storage root, the work folder, the MLflow store and the pipeline's parent run."""

    workdir: Path
    """Local by nature: temporary files, and the SQLite MLflow store when no tracking server is given."""
    tracker: Tracker
    experiment: str
    parent_run_id: str
    log: Callable[[str], None] = print
    stage_key: str = ""
    """Hash of the stage's inputs (set by the workflow): its run is found and reused by it."""
    storage: str = ""
    """The storage root (a local folder or a URI such as s3://bucket/prefix) that holds everything the stages
    produce: datasets, evaluators, Ray Train checkpoints and Tune state. Empty: the work folder."""

    def location(self, *parts: str) -> str:
        """A place under the storage root, as the URI (or absolute path) every node can open."""
        return storage.join(self.storage or self.workdir, *parts)


def run_stage(ctx: Context, name: str, body: Callable[[str], dict[str, Any]], *,
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `body(run_id)` inside a nested MLflow run; prints start/end lines with durations and the run URL.

    With a `ctx.stage_key`, the run carries it and, once FINISHED, its outputs as JSON (the workflow's cache),
    and runs of the same key left RUNNING by a killed attempt are marked KILLED."""
    all_tags = {"stage": name, **(tags or {}), **({"stage_key": ctx.stage_key} if ctx.stage_key else {})}
    stale = ctx.tracker.find_runs(ctx.experiment, {"stage": name, "stage_key": ctx.stage_key},
                                  status="RUNNING") if ctx.stage_key else []
    run_id = ctx.tracker.start_run(ctx.experiment, name, parent_run_id=ctx.parent_run_id, tags=all_tags)
    for old in stale:
        ctx.tracker.end_run(old.info.run_id, "KILLED", error=f"interrupted; the stage went on in run {run_id}")
    if params:
        ctx.tracker.log_params(run_id, params)
    ctx.log(f"[{name}] started  {ctx.tracker.run_url(run_id)}")
    start = time.perf_counter()
    try:
        with ctx.tracker.ending(run_id):
            out = body(run_id)
            if ctx.stage_key:
                ctx.tracker.set_tags(run_id, {"outputs": json.dumps(out, sort_keys=True, default=str)})
    except BaseException as err:
        ctx.log(f"[{name}] FAILED after {time.perf_counter() - start:.1f}s: {type(err).__name__}: {err}")
        raise StageError(f"stage {name} failed: {err}") from err
    ctx.log(f"[{name}] finished in {time.perf_counter() - start:.1f}s")
    return {**out, "run_id": run_id}


def prepare_stage(ctx: Context, cfg: Config) -> dict[str, Any]:
    """Dataset -> Parquet shards + manifest under <storage>/<data.out_dir> (reused when already prepared)."""
    def body(run_id: str) -> dict[str, Any]:
        dataset_dir = prepare(cfg.data, ctx.location(cfg.data.out_dir))
        m = load_manifest(dataset_dir)
        counts = {f"data/{split}_count": float(m.count(split)) for split in m.splits}
        ctx.tracker.log_metrics(run_id, counts, step=0)
        ctx.tracker.set_tags(run_id, {"dataset_id": m.dataset_id, "dataset_hash": m.dataset_hash})
        ctx.log(f"[prepare] {m.dataset_id}: {counts} examples of shape {tuple(m.shape)} -> {dataset_dir}")
        return {"dataset_dir": str(dataset_dir), "dataset_hash": m.dataset_hash, "dataset_id": m.dataset_id}
    return run_stage(ctx, "prepare", body, params={k: v for k, v in flatten(cfg).items() if k.startswith("data.")})


def train_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any] | None = None, *,
                max_failures: int = 1) -> dict[str, Any]:
    """Data-parallel training on Ray Train (or, with a `tune.space`, a search whose trials each train so); rank 0
    logs metrics and sample grids into this stage's run (a search: into one nested run per trial). The Ray run is
    named by the stage's inputs, so a re-run after a crash resumes from its last checkpoint (or the search)."""
    run_name = f"{cfg.name}-{ctx.stage_key}" if ctx.stage_key else None
    evaluator_dir = (evaluator or {}).get("evaluator_dir")

    def body(run_id: str) -> dict[str, Any]:
        tracking = ray_train_worker.Tracking(ctx.tracker.tracking_uri, run_id)
        if cfg.tune.enabled:
            from pipelines import ray_tune

            found = ray_tune.tune(cfg, dataset["dataset_dir"], evaluator_dir=evaluator_dir,
                                  storage_path=ctx.location("ray"), tracking=tracking, run_name=run_name)
            ctx.tracker.set_tags(run_id, {"checkpoint": found.checkpoint_dir})
            ctx.log(f"[train] search: best trial run {found.trial_run_id}; "
                    f"{', '.join(str(t['status']) for t in found.trials)}")
            return {"checkpoint_dir": found.checkpoint_dir, "metrics": found.metrics,
                    "trial_run_id": found.trial_run_id}
        outcome = ray_train.train(cfg, dataset["dataset_dir"], storage_path=ctx.location("ray"), tracking=tracking,
                                  max_failures=max_failures, run_name=run_name,
                                  evaluator_dir=evaluator_dir)
        ctx.tracker.set_tags(run_id, {"checkpoint": outcome.checkpoint_dir})
        return {"checkpoint_dir": outcome.checkpoint_dir, "metrics": outcome.metrics}
    return run_stage(ctx, "train", body, params=flatten(cfg),
                     tags={"dataset_hash": dataset["dataset_hash"], "config_hash": config_hash(cfg)})


def evaluator_stage(ctx: Context, cfg: Config, dataset: dict[str, Any]) -> dict[str, Any]:
    """Trains the feature network of FID/IS/KID on the real training split, records its test accuracy, id and
    the real-vs-real floor; reused without retraining while the data and the evaluator settings are unchanged.
    2-D data (the mode metrics) and the ae family (its reconstruction error on the test split) need none."""
    manifest = load_manifest(dataset["dataset_dir"])
    if manifest.kind == "points" or cfg.model.family == "ae":
        points = manifest.kind == "points"
        evaluator_id = "modes" if points else heldout_protocol(manifest.dataset_hash)

        def without(run_id: str) -> dict[str, Any]:
            ctx.log("[evaluator] " + ("2-D data: scored by the mode metrics" if points else "ae: scored by its "
                    "reconstruction error on the test split") + ", no feature network to train")
            ctx.tracker.set_tags(run_id, {"evaluator_id": evaluator_id, "dataset_hash": manifest.dataset_hash})
            return {"evaluator_dir": None, "evaluator_id": evaluator_id}
        return run_stage(ctx, "evaluator", without, tags={"dataset_hash": manifest.dataset_hash})
    key = hashlib.sha256(json.dumps(evaluator_inputs(cfg, manifest.dataset_hash)).encode()).hexdigest()[:12]
    directory = ctx.location("evaluators", f"{manifest.dataset_id}-{key}")

    def body(run_id: str) -> dict[str, Any]:
        reused = storage.is_file(storage.join(directory, EVALUATOR_META))
        if not reused:
            _train_evaluator(cfg, manifest, directory)
        info = evaluator_meta(directory)
        ctx.tracker.log_metrics(run_id, info["meta"]["metrics"], step=0)
        ctx.tracker.set_tags(run_id, {"evaluator_id": info["evaluator_id"], "reused": str(reused),
                                      "dataset_hash": manifest.dataset_hash})
        ctx.log(f"[evaluator] {'reused' if reused else 'trained'} {info['evaluator_id']}: "
                f"{metrics_line(info['meta']['metrics'])}")
        return {"evaluator_dir": directory, "evaluator_id": info["evaluator_id"],
                "floor": info["meta"]["metrics"]}
    return run_stage(ctx, "evaluator", body, tags={"dataset_hash": manifest.dataset_hash})


def _train_evaluator(cfg: Config, manifest: Any, directory: str) -> None:
    x_train, y_train = read_split(manifest, "train")
    x_test, y_test = read_split(manifest, "test")
    model, acc = train_evaluator(x_train, y_train, x_test, y_test, epochs=cfg.eval.evaluator_epochs,
                                 seed=cfg.eval.seed, device=local_device())
    n = min(cfg.eval.num_samples, len(x_train), len(x_test))
    metrics = {"evaluator/test_accuracy": acc, **real_floor(x_train, x_test, model, num_samples=n,
                                                             batch_size=cfg.eval.batch_size, seed=cfg.eval.seed)}
    # Published whole (evaluator.json last), so an interrupted run leaves no half-saved evaluator.
    with tempfile.TemporaryDirectory(prefix="gan-evaluator-") as tmp:
        save_evaluator(model, Path(tmp) / "evaluator", meta={"metrics": metrics, "dataset_hash": manifest.dataset_hash})
        storage.publish(Path(tmp) / "evaluator", directory, last=EVALUATOR_META)


def evaluate_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                   trained: dict[str, Any]) -> dict[str, Any]:
    """Scores G_ema (eval/...) and G (eval_raw/...) from the trained checkpoint; logs a sample PNG. A VAE also gets
    its reconstruction error on the test split; the ae family, not a generator, gets only that
    (`evaluate_autoencoder`)."""
    if cfg.model.family == "ae":
        return run_stage(ctx, "evaluate", lambda run_id: evaluate_autoencoder(ctx, run_id, cfg, dataset, trained),
                         tags={"dataset_hash": dataset["dataset_hash"]})

    def body(run_id: str) -> dict[str, Any]:
        gens, trained_cfg, extra = generators_from_checkpoint(trained["checkpoint_dir"])
        device = local_device()
        gens = {name: G.to(device) for name, G in gens.items()}
        # The checkpoint's own model settings (a search may have changed them), scored under this run's eval.
        scoring = replace(trained_cfg, eval=cfg.eval)
        primary = primary_generator(scoring)
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        images = evaluator["evaluator_dir"] is not None
        if images:
            x_train, y_train = read_split(dataset["dataset_dir"], "train", verify=False)
            net = load_evaluator(evaluator["evaluator_dir"], map_location=device)
            sized = _capped(scoring, cfg, len(x_train))
        for name, G in gens.items():
            prefix = "eval/" if name == primary else "eval_raw/"
            if not images:
                metrics.update(score_points(G, scoring, extra["scale"], prefix)[0])
                continue
            metrics.update(score_images(G, sized, extra["num_classes"], x_train, net, prefix))
            if cfg.eval.inception_weights and name == primary:
                # Inception features on top of the evaluator's, for numbers comparable with the literature.
                inception = score_images(G, sized, extra["num_classes"], x_train,
                                         load_inception(cfg.eval.inception_weights).to(device), "eval/inception_")
                metrics.update({k: v for k, v in inception.items() if "/inception_fid" in k or "_is_" in k})
        if scoring.model.semi_supervised:
            x_test, y_test = read_split(dataset["dataset_dir"], "test", verify=False)
            metrics.update(semi_supervised_metrics(discriminator_from_checkpoint(trained["checkpoint_dir"]),
                                                   x_train, y_train, x_test, y_test, labels=scoring.model.labels,
                                                   seed=scoring.train.seed))
        if scoring.model.family == "vae":
            metrics.update(_test_reconstruction(cfg, dataset, trained, device)[0])
        metrics["perf/eval_seconds"] = time.perf_counter() - start
        metrics.update(evaluator.get("floor") or {})
        ctx.tracker.log_metrics(run_id, metrics, step=0)
        tags = {"evaluator_id": evaluator.get("evaluator_id", "modes"), "generator": primary,
                "checkpoint": trained["checkpoint_dir"]}
        ctx.tracker.set_tags(run_id, tags)
        with tempfile.TemporaryDirectory() as tmp:
            png = save_sample_png(gens[primary], scoring, extra, Path(tmp) / "samples.png")
            ctx.tracker.log_artifact(run_id, png)
        ctx.log(f"[evaluate] {metrics_line(metrics)}")
        return {"metrics": metrics, **tags}
    return run_stage(ctx, "evaluate", body, tags={"dataset_hash": dataset["dataset_hash"]})


def _test_reconstruction(cfg: Config, dataset: dict[str, Any], trained: dict[str, Any], device: Any
                         ) -> tuple[dict[str, float], Any, Any, Any]:
    """An autoencoder checkpoint's reconstruction metrics on the test split, its encoder and decoder, and the split."""
    encoder, decoder, _, _ = autoencoder_from_checkpoint(trained["checkpoint_dir"])
    encoder, decoder = encoder.to(device), decoder.to(device)
    x_test, _ = read_split(dataset["dataset_dir"], "test", verify=False)
    return reconstruction_metrics(encoder, decoder, x_test, batch_size=cfg.eval.batch_size), encoder, decoder, x_test


def evaluate_autoencoder(ctx: Context, run_id: str, cfg: Config, dataset: dict[str, Any],
                         trained: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage's body for the ae family: eval/reconstruction_error (the mean squared error per pixel in
    [0, 1], its score) and eval/reconstruction_bce on the whole test split, under the split's protocol id; logs a PNG
    of test images above their reconstructions."""
    start = time.perf_counter()
    metrics, encoder, decoder, x_test = _test_reconstruction(cfg, dataset, trained, local_device())
    metrics["perf/eval_seconds"] = time.perf_counter() - start
    ctx.tracker.log_metrics(run_id, metrics, step=0)
    tags = {"evaluator_id": heldout_protocol(dataset["dataset_hash"]), "generator": "G",
            "checkpoint": trained["checkpoint_dir"]}
    ctx.tracker.set_tags(run_id, tags)
    with tempfile.TemporaryDirectory() as tmp:
        ctx.tracker.log_artifact(run_id, save_reconstruction_png(encoder, decoder, x_test, Path(tmp) / "samples.png"))
    ctx.log(f"[evaluate] {metrics_line(metrics)}")
    return {"metrics": metrics, **tags}


def _capped(scoring: Config, cfg: Config, real_count: int) -> Config:
    """`scoring` under cfg's eval settings, with no more samples per metric than there are real images."""
    return replace(scoring, eval=replace(cfg.eval, num_samples=min(cfg.eval.num_samples, real_count)))


def metrics_line(metrics: dict[str, float]) -> str:
    """Metrics as one JSON line for people: sorted, 4 decimals."""
    return json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())})


def evaluator_inputs(cfg: Config, dataset_hash: str) -> list[Any]:
    """What decides an evaluator: the data and the eval settings it is trained and floored with (its folder name
    and the evaluator stage's cache key both come from these)."""
    return [dataset_hash, cfg.eval.evaluator_epochs, cfg.eval.seed, cfg.eval.num_samples]


def evaluate_model_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                         model_uri: str, *, device: str = "cpu") -> dict[str, Any]:
    """Scores a logged or registered generator (`models:/gan-mnist@champion`) like the evaluate stage scores a
    checkpoint: the same evaluator, sample count and seeded latents give the same numbers."""
    def body(run_id: str) -> dict[str, Any]:
        metrics = score_model(ctx.tracker, cfg, dataset, evaluator, model_uri, device=device)
        ctx.tracker.log_metrics(run_id, metrics, step=0)
        ctx.log(f"[evaluate] {model_uri}: {metrics_line(metrics)}")
        return {"metrics": metrics, "model_uri": model_uri, "evaluator_id": evaluator.get("evaluator_id")}
    return run_stage(ctx, "evaluate", body, tags={"model_uri": model_uri, "dataset_hash": dataset["dataset_hash"],
                                                   "evaluator_id": str(evaluator.get("evaluator_id"))})


def score_model(tracker: Tracker, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                model_uri: str, *, device: str = "cpu") -> dict[str, float]:
    """The evaluation metrics of a logged or registered generator under `cfg`'s eval settings and `evaluator`,
    sampled and featurised on `device`."""
    served, shapes, metadata = tracker.load_generator(model_uri)
    served = served.to(device)
    points = bool(metadata.get("points"))
    G = ModelRangeView(served, points=points)
    num_classes = int(metadata.get("num_classes") or 0)
    scoring = replace(cfg, model=replace(cfg.model, z_dim=shapes[0][1], conditional=len(shapes) > 1))
    if points:
        return score_points(G, scoring, 1.0)[0]
    x_train, _ = read_split(dataset["dataset_dir"], "train", verify=False)
    metrics = score_images(G, _capped(scoring, cfg, len(x_train)), num_classes, x_train,
                           load_evaluator(evaluator["evaluator_dir"], map_location=device))
    return {**metrics, **(evaluator.get("floor") or {})}
