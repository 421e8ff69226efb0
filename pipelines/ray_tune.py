"""Hyperparameter search (with tune_output.py and tune_workers.py, the only modules importing ray.tune): ASHA, PBT or
random search over the config's `tune.space`, each trial one MLflow run nested in the stage's. A trial that needs one
worker trains in its own Tune trial process (tune_trial.py); one that needs several runs a TorchTrainer
(tune_workers.py)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune as rt
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from gan import storage
from gan.checkpoint import META_FILE
from gan.config import Config, ConfigError
from gan.config_loader import apply_overrides, flatten, from_dict, to_dict
from gan.data import load_manifest, read_split
from gan.loop import NonFiniteLossError
from gan.metrics.in_training import best_scored, score_key
from gan.tune_space import PBT_MUTABLE, SPEC_KINDS, applies
from pipelines import ray_compat, ray_train, ray_train_worker
from pipelines.tracking import Tracker
from pipelines.tune_output import TrialProgress, ray_output_wanted, search_output
from pipelines.tune_trial import PHASES, TrialClock, train_in_trial, trains_in_trial, trial_start
from pipelines.tune_workers import FreeTrialWorkers, free_workers, train_on_workers


class SearchInterrupted(RuntimeError):
    """The search stopped with trials unfinished; running it again with the same name and storage resumes it."""


@dataclass(frozen=True)
class TuneOutcome:
    checkpoint_dir: str
    """The best trial's best-scoring checkpoint (not its last)."""
    metrics: dict[str, float]
    """What that checkpoint was reported with (its in-training score included)."""
    config: Config
    """The best trial's config as a plain training config (the search's name, no tune section)."""
    trial_run_id: str
    """The best trial's MLflow run."""
    trials: list[dict[str, Any]]
    """Per trial: trial_id, status (finished, stopped_early, diverged, error), kimg, best_metric, run_id, space (its
    sampled values) and seconds (its lifetime, `total`, split into tune_trial.PHASES)."""


def trial_resources(cfg: Config, in_trial: bool) -> dict[str, float]:
    """What a trial's Tune trainable reserves: a worker's resources when it trains in itself, else
    tune.cpus_per_trial (its TorchTrainer's workers reserve their own)."""
    if not in_trial:
        return {"CPU": cfg.tune.cpus_per_trial}
    return {"CPU": cfg.scale.cpus_per_worker, **({"GPU": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {}),
            **cfg.scale.worker_resources}


def max_concurrent_trials(cfg: Config, resources: dict[str, float], in_trial: bool = False) -> int:
    """How many trials run at once. A trial that trains in itself holds one worker's CPUs (and GPU); one on a
    TorchTrainer holds tune.cpus_per_trial plus its workers, and one whole CPU stays free for Ray Data's Parquet
    read tasks (without it they never schedule)."""
    cpus = resources.get("CPU", 0.0)
    workers = 1 if in_trial else cfg.scale.num_workers
    if in_trial:
        fits, why = int(cpus / cfg.scale.cpus_per_worker + 1e-9), (
            f"a trial trains in itself on scale.cpus_per_worker={cfg.scale.cpus_per_worker:g} CPUs")
    else:
        per_trial = cfg.tune.cpus_per_trial + cfg.scale.num_workers * cfg.scale.cpus_per_worker
        fits, why = int((cpus - ray_compat.RAY_DATA_READ_CPUS) / per_trial + 1e-9), (
            f"a trial takes tune.cpus_per_trial={cfg.tune.cpus_per_trial:g} + scale.num_workers="
            f"{cfg.scale.num_workers} x scale.cpus_per_worker={cfg.scale.cpus_per_worker:g} CPUs and Ray Data needs "
            f"{ray_compat.RAY_DATA_READ_CPUS:g} CPU free")
    if cfg.scale.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) / (workers * cfg.scale.gpus_per_worker) + 1e-9))
    if fits < 1:
        raise ConfigError(f"not even one trial fits: {why} (and scale.gpus_per_worker per worker when scale.use_gpu); "
                          f"the cluster "
                          f"has {cpus:g} CPUs and {resources.get('GPU', 0.0):g} GPUs")
    if cfg.tune.max_concurrent_trials:
        if cfg.tune.max_concurrent_trials > fits:
            raise ConfigError(f"tune.max_concurrent_trials={cfg.tune.max_concurrent_trials} trials do not fit: "
                              f"{fits} do on {cpus:g} CPUs")
        return cfg.tune.max_concurrent_trials
    return min(fits, cfg.tune.num_samples)


def _domain(spec: dict[str, Any]) -> Any:
    kind = next(k for k in SPEC_KINDS if k in spec)
    values = spec[kind]
    if kind == "choice":
        return rt.choice(values)
    if kind == "randint":
        return rt.randint(values[0], values[1] + 1)  # both ends included, as documented on tune.space
    return rt.loguniform(*values) if kind == "loguniform" else rt.uniform(*values)


def trial_config(cfg: Config, sampled: dict[str, Any], name: str | None = None) -> Config:
    """The plain training config of a trial: the search's config with the sampled values that apply to it (a
    conditional entry applies when its `when` holds for the trial's other values)."""
    base = to_dict(cfg)
    base["tune"] = {}
    space = cfg.tune.space
    plain = {k: v for k, v in sampled.items() if "when" not in space[k]}
    values = apply_overrides(base, plain)
    flat = flatten(from_dict(values))
    conditional = {k: v for k, v in sampled.items() if "when" in space[k] and applies(space[k], flat)}
    values = apply_overrides(values, {**conditional, **({"name": name} if name else {})})
    return from_dict(values)


def _find_trial_run(tracker: Tracker, experiment_id: str, search: str, trial_id: str) -> Any:
    runs = tracker.client.search_runs(
        [experiment_id], filter_string=f"tags.search = '{search}' and tags.trial_id = '{trial_id}'")
    return runs[0] if runs else None


def _trial_run(tracker: Tracker, setup: dict[str, Any], trial_id: str, cfg: Config) -> str:
    """The trial's MLflow run: created (params logged once) on its first start, reused when PBT or a resumed search
    starts it again, so MLflow never sees a param change."""
    found = _find_trial_run(tracker, setup["experiment_id"], setup["search"], trial_id)
    if found is not None:
        tracker.client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run_id = tracker.start_run(setup["experiment"], f"trial-{trial_id}", parent_run_id=setup["parent_run_id"],
                               tags={"stage": "trial", "search": setup["search"], "trial_id": trial_id})
    tracker.log_params(run_id, flatten(cfg))
    return run_id


def _trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: builds its config, resumes from Tune's checkpoint (its own, or after a PBT exploit a better
    trial's), trains (in this process, or on a TorchTrainer when it needs several workers) and reports every scored
    checkpoint to Tune. Its MLflow run gets where its time went (trial_time/*_s) however it ends."""
    clock = TrialClock(trial_start())
    for key, value in ray_compat.SLOW_TRIAL_STOP_ENV.items():
        os.environ.setdefault(key, value)
    if not setup["verbose"]:  # "Checkpoint successfully created at ..." at INFO on every report
        logging.getLogger(ray_compat.TRAIN_LOGGER).setLevel(logging.WARNING)
    trial_id = rt.get_context().get_trial_id()
    search_cfg = from_dict(setup["config"])
    cfg = trial_config(search_cfg, config["space"], f"{search_cfg.name}-{trial_id}")
    tracker = Tracker(setup["tracking_uri"])
    run_id = _trial_run(tracker, setup, trial_id, cfg)
    checkpoint = rt.get_checkpoint()
    _log_start(tracker, run_id, cfg, search_cfg.name, checkpoint, setup["search"])
    tracking = ray_train_worker.Tracking(setup["tracking_uri"], run_id)
    try:
        # When Tune stops the trial (SystemExit out of tune.report), its run stays RUNNING: it may go on.
        with tracker.ending(run_id, failed=(Exception,)):
            if setup["train_split"] is not None:
                train_in_trial(cfg, ray.get(setup["train_split"]), dataset_dir=setup["dataset_dir"],
                               evaluator_dir=setup["evaluator_dir"], tracking=tracking, resume=checkpoint,
                               send=_to_tune(setup["metric"]), clock=clock)
            else:
                train_on_workers(cfg, setup, trial_id, tracking, checkpoint, clock)
    except Exception as err:
        tracker.set_tags(run_id, {"diverged": str(isinstance(err, NonFiniteLossError)
                                                  or "NonFiniteLossError" in str(err)).lower()})
        raise
    finally:
        tracker.log_metrics(run_id, clock.summary(), step=round(clock.last.get("progress/kimg", 0.0) * 1000))


def _log_start(tracker: Tracker, run_id: str, cfg: Config, search_name: str, checkpoint: Any, search: str) -> None:
    """What a trial (re)starts from: after a PBT exploit the donor trial, and the learning rates PBT may change,
    as metrics at the checkpoint's images (MLflow refuses to change a param)."""
    images = 0
    if checkpoint is not None:
        meta = json.loads(storage.read_bytes(storage.join(storage.uri_of(search, checkpoint.path), META_FILE)))
        images = int(meta["images"])
        if meta["name"] != cfg.name:
            tracker.set_tags(run_id, {"pbt.exploited_from": meta["name"].removeprefix(f"{search_name}-")})
            tracker.log_metrics(run_id, {"pbt/exploited": 1.0}, step=images)
    tracker.log_metrics(run_id, {f"hp/{k}": flatten(cfg)[k] for k in PBT_MUTABLE}, step=images)


def _to_tune(metric: str) -> Callable[[dict[str, Any], str | None], None]:
    """An in-trial report's last step: a scored checkpoint goes to Tune (copied into the trial's storage)."""
    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None and metric in metrics:
            rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(checkpoint_dir))
    return send


def _scheduler(cfg: Config, metric: str) -> Any:
    t = cfg.tune
    if t.scheduler == "asha":
        return AsyncHyperBandScheduler(time_attr="progress/kimg", metric=metric, mode="min", max_t=cfg.train.kimg,
                                       grace_period=t.grace_kimg, reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        mutations = {k: _domain(t.space[k]) if "choice" not in t.space[k] else t.space[k]["choice"]
                     for k in PBT_MUTABLE if k in t.space}
        # Results without the score (none are forwarded, but Tune adds its own) must not stop the search.
        return PopulationBasedTraining(time_attr="progress/kimg", metric=metric, mode="min",
                                       perturbation_interval=t.perturbation_interval_kimg,
                                       hyperparam_mutations={"space": mutations},
                                       quantile_fraction=t.quantile_fraction, synch=t.pbt_synchronous,
                                       require_attrs=False)
    return FIFOScheduler()  # plain random search: every trial trains to train.kimg


def _tuner(cfg: Config, trainable: Any, metric: str, experiment: str, concurrent: int, setup: dict[str, Any]
           ) -> Any:
    fs, path = storage.resolve(experiment)
    if rt.Tuner.can_restore(path, storage_filesystem=fs):
        return rt.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                restart_errored=False, storage_filesystem=fs)
    callbacks: list[rt.Callback] = [TrialProgress(metric, cfg.train.kimg, cfg.tune.scheduler)]
    if setup["train_split"] is None:  # trials on TorchTrainers
        callbacks.append(FreeTrialWorkers(setup["train_storage"]))
    keep = None if cfg.tune.scheduler == "pbt" else max(2, cfg.train.keep_checkpoints)  # PBT clones old checkpoints
    search = BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)
    return rt.Tuner(
        trainable,
        param_space={"space": {k: _domain(spec) for k, spec in cfg.tune.space.items()}},
        tune_config=rt.TuneConfig(scheduler=_scheduler(cfg, metric), num_samples=cfg.tune.num_samples,
                                  search_alg=search, reuse_actors=setup["train_split"] is not None,
                                  trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=rt.RunConfig(
            name=storage.name(experiment), **ray_train.run_storage(storage.parent(experiment)),
            failure_config=rt.FailureConfig(max_failures=0),
            checkpoint_config=rt.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                                  checkpoint_score_order="min"),
            callbacks=callbacks, verbose=1 if setup["verbose"] else 0),
    )


def tune(cfg: Config, dataset_dir: str | Path, *, evaluator_dir: str | Path | None, storage_path: str | Path,
         tracking: ray_train_worker.Tracking, run_name: str | None = None,
         ) -> TuneOutcome:
    """Runs the search of `cfg.tune` on the connected Ray cluster and returns its best trial's best checkpoint.

    Each trial is an MLflow run nested under `tracking.run_id`. A search interrupted before all trials ended raises
    SearchInterrupted; running it again with the same `run_name` (default `<name>-search`) and storage resumes it:
    finished trials are kept, unfinished ones go on from their last checkpoint.
    """
    if not cfg.tune.enabled:
        raise ConfigError("tune.space is empty: there is nothing to search")
    if not cfg.train.scores:
        raise ConfigError("a search ranks trials by their in-training score: set train.fid_every_kimg > 0")
    metric = cfg.tune.metric or score_key(cfg)
    in_trial = trains_in_trial(cfg, load_manifest(dataset_dir))
    concurrent = max_concurrent_trials(cfg, ray.cluster_resources(), in_trial)
    tracker = Tracker(tracking.tracking_uri)
    experiment_id = tracker.run(tracking.run_id).info.experiment_id
    search = storage.join(storage_path, run_name or f"{cfg.name}-search")
    setup = {"config": to_dict(cfg), "dataset_dir": storage.normalize(dataset_dir),
             "evaluator_dir": storage.normalize(evaluator_dir) if evaluator_dir else None,
             "train_storage": storage.join(storage.parent(search), f"{storage.name(search)}-train"),
             "tracking_uri": tracking.tracking_uri, "parent_run_id": tracking.run_id, "experiment_id": experiment_id,
             "experiment": tracker.client.get_experiment(experiment_id).name, "search": search,
             "metric": metric, "verbose": ray_output_wanted(),
             # Read once here and shared through the object store by every trial that trains in itself.
             "train_split": ray.put(read_split(dataset_dir, "train", verify=False)) if in_trial else None}
    trainable = rt.with_resources(rt.with_parameters(_trial, setup=setup), trial_resources(cfg, in_trial))
    try:
        with search_output():
            grid = _tuner(cfg, trainable, metric, search, concurrent, setup).fit()
    finally:  # whatever ended the search, no trial keeps its workers' CPUs
        free_workers(setup["train_storage"])
    fs, path = storage.resolve(search)
    statuses = {t.trial_id: t.status for t in rt.ExperimentAnalysis(path, storage_filesystem=fs).trials}
    unfinished = sorted(t for t, s in statuses.items() if s not in ("TERMINATED", "ERROR"))
    unstarted = cfg.tune.num_samples - len(statuses)  # not yet drawn when it stopped: trials start as slots free
    if unfinished or unstarted > 0:
        raise SearchInterrupted(f"search {storage.name(search)} stopped with trials {', '.join(unfinished) or '-'} "
                                f"unfinished and {max(unstarted, 0)} not started; run it again with the same name and "
                                f"storage to resume")
    return _outcome(cfg, grid, metric, tracker, setup)


def _kimg_spent(result: Any) -> float:
    """kimg trained by a trial: the rises of progress/kimg over its results (a PBT restore jumps, not trains)."""
    df = result.metrics_dataframe
    if df is None or "progress/kimg" not in df:
        return 0.0
    kimg = [0.0, *df["progress/kimg"].tolist()]
    return float(sum(max(0.0, b - a) for a, b in zip(kimg, kimg[1:], strict=False)))


def _seconds(tracker: Tracker, run_id: str) -> dict[str, float]:
    """A trial's time by phase (and `total`), summed over its starts (a PBT exploit or a resume starts it again)."""
    return {p: sum(m.value for m in tracker.metric_history(run_id, f"trial_time/{p}_s")) for p in ("total", *PHASES)}


def _outcome(cfg: Config, grid: Any, metric: str, tracker: Tracker, setup: dict[str, Any]) -> TuneOutcome:
    trials, best = [], None
    for result in grid:
        trial_id = Path(result.path).name
        run = _find_trial_run(tracker, setup["experiment_id"], setup["search"], trial_id)
        run_id = run.info.run_id if run else None
        top = best_scored(result.best_checkpoints or [], metric)
        kimg = _kimg_spent(result)
        if result.error is not None:
            status = "diverged" if "NonFiniteLossError" in str(result.error) else "error"
        else:
            status = "finished" if kimg >= cfg.train.kimg - 1e-9 or cfg.tune.scheduler == "pbt" else "stopped_early"
            if run is not None and run.info.status == "RUNNING":  # a stopped trial's process ended without a word
                tracker.end_run(run_id, "FINISHED")
        if run_id:
            tracker.set_tags(run_id, {"tune.status": status})
        trials.append({"trial_id": trial_id, "status": status, "kimg": kimg, "run_id": run_id,
                       "best_metric": top[1][metric] if top else None, "space": result.config["space"],
                       "seconds": _seconds(tracker, run_id) if run_id else {}})
        if top is not None and result.error is None and (best is None or top[1][metric] < best[1][1][metric]):
            best = (result, top, run_id)
    if best is None:
        raise RuntimeError(f"no trial of the search produced a finite {metric}: {trials}")
    result, (checkpoint, metrics), run_id = best
    config = trial_config(cfg, result.config["space"])
    checkpoint_uri = storage.uri_of(setup["search"], checkpoint.path)
    tracker.set_tags(setup["parent_run_id"], {"best_trial": Path(result.path).name, "best_trial_run_id": run_id,
                                              "best_checkpoint": checkpoint_uri})
    kept = {k: float(v) for k, v in metrics.items() if "/" in k and isinstance(v, (int, float))}
    return TuneOutcome(checkpoint_dir=checkpoint_uri, metrics=kept, config=config, trial_run_id=run_id,
                       trials=sorted(trials, key=lambda t: t["trial_id"]))
