"""Hyperparameter search (the only module importing ray.tune): a function trainable runs one TorchTrainer per trial
under ASHA, PBT or random search over the config's `tune.space`, each trial one MLflow run nested in the stage's."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import PlacementGroupID
from ray import tune as rt
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Empty, Queue

from gan import storage
from gan.checkpoint import META_FILE
from gan.config import Config, ConfigError, apply_overrides, flatten, from_dict, to_dict
from gan.metrics.in_training import UNSCORED, score_key
from gan.tune_space import PBT_MUTABLE, SPEC_KINDS, applies
from pipelines import ray_train
from pipelines.tracking import Tracker
from pipelines.tune_trial import PHASES, TrialClock, trial_start


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
    sampled values) and seconds (its lifetime, `trial`, split into tune_trial.PHASES)."""


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials run at once: each holds its trainable's tune.cpus_per_trial plus its workers, and one whole CPU
    stays free for Ray Data's Parquet read tasks (without it they never schedule)."""
    cpus = resources.get("CPU", 0.0)
    per_trial = cfg.tune.cpus_per_trial + cfg.scale.num_workers * cfg.scale.cpus_per_worker
    fits = int((cpus - 1.0) / per_trial + 1e-9)
    if cfg.scale.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) // cfg.scale.num_workers))
    if fits < 1:
        raise ConfigError(
            f"not even one trial fits: a trial takes tune.cpus_per_trial={cfg.tune.cpus_per_trial:g} + "
            f"scale.num_workers={cfg.scale.num_workers} x scale.cpus_per_worker={cfg.scale.cpus_per_worker:g} CPUs "
            f"(and a GPU per worker when scale.use_gpu), the cluster has {cpus:g} CPUs and "
            f"{resources.get('GPU', 0.0):g} GPUs, and Ray Data needs 1 CPU free")
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


def _trial_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


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
    trial's), trains on a TorchTrainer and reports every scored checkpoint to Tune."""
    trial_id = rt.get_context().get_trial_id()
    clock = TrialClock(trial_start())
    search_cfg = from_dict(setup["config"])
    cfg = trial_config(search_cfg, config["space"], f"{search_cfg.name}-{trial_id}")
    tracker = Tracker(setup["tracking_uri"])
    run_id = _trial_run(tracker, setup, trial_id, cfg)
    checkpoint = rt.get_checkpoint()
    checkpoint_uri = storage.uri_of(setup["search"], checkpoint.path) if checkpoint is not None else None
    images = 0
    if checkpoint_uri is not None:
        meta = json.loads(storage.read_bytes(storage.join(checkpoint_uri, META_FILE)))
        images = int(meta["images"])
        if meta["name"] != cfg.name:
            donor = meta["name"].removeprefix(f"{search_cfg.name}-")
            tracker.set_tags(run_id, {"pbt.exploited_from": donor})
            tracker.log_metrics(run_id, {"pbt/exploited": 1.0}, step=images)
    # Hyperparameters PBT may change are tracked as metrics: MLflow refuses to change a param.
    tracker.log_metrics(run_id, {f"hp/{k}": flatten(cfg)[k] for k in PBT_MUTABLE}, step=images)
    faults = dict(setup["faults"])
    if faults.get("trial_index") not in (None, _trial_index(trial_id)):
        faults = {}
    # Not TuneReportCallback: it forwards only the checkpoint's path, so Tune would hold no checkpoint for PBT to
    # exploit or for a resumed search to restore. ForwardReports hands this thread each report to re-report with one.
    reports, acks = Queue(maxsize=1, actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    run_name = f"{trial_id}-{uuid.uuid4().hex[:8]}"
    group_file = storage.join(setup["train_storage"], f"{run_name}.placement_group")
    train_fs, _ = storage.resolve(setup["train_storage"])
    trainer = ray_train.build_trainer(
        cfg, setup["dataset_dir"], storage_path=setup["train_storage"], run_name=run_name,
        tracking=ray_train.Tracking(setup["tracking_uri"], run_id), max_failures=0, faults=faults,
        evaluator_dir=setup["evaluator_dir"], resume_from=checkpoint_uri,
        callbacks=[ray_train.ForwardReports(reports, acks)], in_memory_data=True,
        placement_group_file=str(group_file))
    box: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # handed to the trial's thread below
            box["error"] = err

    # The trainer runs beside this thread, which turns its scored reports into Tune results with checkpoints.
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not reports.empty():
            try:
                item = reports.get(timeout=1.0)
            except Empty:
                continue
            clock.report_arrived(item["metrics"])
            try:
                scored = setup["metric"] in item["metrics"] and UNSCORED not in item["metrics"]
                if scored and item["checkpoint"]:
                    rt.report(item["metrics"], checkpoint=rt.Checkpoint(item["checkpoint"], filesystem=train_fs))
            except BaseException:  # Tune stopped the trial (ASHA, a PBT exploit, an interrupt): SystemExit
                # This process ends within moments: have the Train run abort, and free its workers ourselves
                # in case it does not get to it (Train's own cleaner needs the dashboard's State API).
                clock.report_done(item["metrics"])
                acks.put(ray_train.ForwardReports.STOP)
                _remove_placement_group(group_file)
                raise
            acks.put(True)
            clock.report_done(item["metrics"])
        thread.join()
    finally:
        _remove_placement_group(group_file)
        tracker.log_metrics(run_id, clock.summary(), step=round(clock.last.get("progress/kimg", 0.0) * 1000))
    if "error" in box:
        diverged = "NonFiniteLossError" in str(box["error"])
        tracker.set_tags(run_id, {"diverged": str(diverged).lower()})
        tracker.end_run(run_id, "FAILED", error=f"{type(box['error']).__name__}: {box['error']}")
        raise box["error"]
    tracker.end_run(run_id, "FINISHED")


def _remove_placement_group(group_file: str) -> None:
    """Removes a trial's worker placement group if Ray Train left it. A stopped trial's process is killed with its
    Train controller, and Train's detached cleaner then finds the dead controller through the State API, which a
    Ray without its dashboard lacks: the workers' CPUs stayed reserved and later trials never started."""
    group_id = storage.read_bytes(group_file).decode().strip() if storage.exists(group_file) else ""
    if not group_id:
        return
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)


class _FreeTrialWorkers(rt.Callback):
    """Removes an ended trial's worker placement groups from the driver: a trial process that Tune ends while it
    is not inside tune.report (an interrupt, a stop between reports) is killed before it can do so itself."""

    def __init__(self, train_storage: str):
        self.train_storage = train_storage

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _free_workers(self.train_storage, trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _free_workers(self.train_storage, trial.trial_id)


def _free_workers(train_storage: str, trial_id: str = "") -> None:
    """Removes the placement groups recorded for one trial (all trials when empty) and their records."""
    for name in storage.list_names(train_storage):
        if name.endswith(".placement_group") and name.startswith(f"{trial_id}-" if trial_id else ""):
            group_file = storage.join(train_storage, name)
            _remove_placement_group(group_file)
            storage.delete(group_file)


class _InterruptOnce(rt.Callback):
    """Test hook: interrupts the search like Ctrl+C once `after` trials have completed (a marker file makes it
    fire once, also across a resume)."""

    def __init__(self, after: int, marker: str):
        self.after, self.marker, self.done = after, marker, 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        if self.done >= self.after and not Path(self.marker).exists():
            Path(self.marker).write_text("interrupted\n")
            os.kill(os.getpid(), signal.SIGUSR1)


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


def _tuner(cfg: Config, trainable: Any, metric: str, experiment: str, concurrent: int, faults: dict[str, Any],
           train_storage: str) -> Any:
    fs, path = storage.resolve(experiment)
    if rt.Tuner.can_restore(path, storage_filesystem=fs):
        return rt.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                restart_errored=False, storage_filesystem=fs)
    callbacks: list[rt.Callback] = [_FreeTrialWorkers(train_storage)]
    if faults.get("interrupt_after_trials"):
        callbacks.append(_InterruptOnce(faults["interrupt_after_trials"], faults["marker"]))
    keep = None if cfg.tune.scheduler == "pbt" else max(2, cfg.train.keep_checkpoints)  # PBT clones old checkpoints
    search = BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrent)
    return rt.Tuner(
        trainable,
        param_space={"space": {k: _domain(spec) for k, spec in cfg.tune.space.items()}},
        tune_config=rt.TuneConfig(scheduler=_scheduler(cfg, metric), num_samples=cfg.tune.num_samples,
                                  search_alg=search,
                                  trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=rt.RunConfig(
            name=storage.name(experiment), **ray_train.run_storage(storage.parent(experiment)),
            failure_config=rt.FailureConfig(max_failures=0),
            checkpoint_config=rt.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                                  checkpoint_score_order="min"),
            callbacks=callbacks, verbose=1),
    )


def tune(cfg: Config, dataset_dir: str | Path, *, evaluator_dir: str | Path | None, storage_path: str | Path,
         tracking: ray_train.Tracking, run_name: str | None = None,
         faults: dict[str, Any] | None = None) -> TuneOutcome:
    """Runs the search of `cfg.tune` on the connected Ray cluster and returns its best trial's best checkpoint.

    Each trial is an MLflow run nested under `tracking.run_id`. A search interrupted before all trials ended raises
    SearchInterrupted; running it again with the same `run_name` (default `<name>-search`) and storage resumes it:
    finished trials are kept, unfinished ones go on from their last checkpoint. `faults` are test hooks:
    ray_train's (applied to trial number `trial_index` only, when given) and `interrupt_after_trials` + `marker`.
    """
    if not cfg.tune.enabled:
        raise ConfigError("tune.space is empty: there is nothing to search")
    if not cfg.train.scores:
        raise ConfigError("a search ranks trials by their in-training score: set train.fid_every_kimg > 0")
    metric = cfg.tune.metric or score_key(cfg)
    concurrent = max_concurrent_trials(cfg, ray.cluster_resources())
    tracker = Tracker(tracking.tracking_uri)
    experiment_id = tracker.run(tracking.run_id).info.experiment_id
    search = storage.join(storage_path, run_name or f"{cfg.name}-search")
    setup = {"config": to_dict(cfg), "dataset_dir": storage.normalize(dataset_dir),
             "evaluator_dir": storage.normalize(evaluator_dir) if evaluator_dir else None,
             "train_storage": storage.join(storage.parent(search), f"{storage.name(search)}-train"),
             "tracking_uri": tracking.tracking_uri, "parent_run_id": tracking.run_id, "experiment_id": experiment_id,
             "experiment": tracker.client.get_experiment(experiment_id).name, "search": search,
             "metric": metric, "faults": faults or {}}
    trainable = rt.with_resources(rt.with_parameters(_trial, setup=setup), {"CPU": cfg.tune.cpus_per_trial})
    try:
        grid = _tuner(cfg, trainable, metric, search, concurrent, faults or {}, setup["train_storage"]).fit()
    finally:  # whatever ended the search, no trial keeps its workers' CPUs
        _free_workers(setup["train_storage"])
    fs, path = storage.resolve(search)
    statuses = {t.trial_id: t.status for t in rt.ExperimentAnalysis(path, storage_filesystem=fs).trials}
    unfinished = sorted(t for t, s in statuses.items() if s not in ("TERMINATED", "ERROR"))
    if unfinished:
        raise SearchInterrupted(f"search {storage.name(search)} stopped with trials {', '.join(unfinished)} "
                                f"unfinished; run it again with the same name and storage to resume")
    return _outcome(cfg, grid, metric, tracker, setup)


def _kimg_spent(result: Any) -> float:
    """kimg trained by a trial: the rises of progress/kimg over its results (a PBT restore jumps, not trains)."""
    df = result.metrics_dataframe
    if df is None or "progress/kimg" not in df:
        return 0.0
    kimg = [0.0, *df["progress/kimg"].tolist()]
    return float(sum(max(0.0, b - a) for a, b in zip(kimg, kimg[1:], strict=False)))


def _seconds(tracker: Tracker, run_id: str) -> dict[str, float]:
    """A trial's time by phase, summed over its starts (a PBT exploit or a resume starts it again)."""
    return {p: sum(m.value for m in tracker.metric_history(run_id, f"time/{p}_s")) for p in ("trial", *PHASES)}


def _outcome(cfg: Config, grid: Any, metric: str, tracker: Tracker, setup: dict[str, Any]) -> TuneOutcome:
    trials, best = [], None
    for result in grid:
        trial_id = Path(result.path).name
        run = _find_trial_run(tracker, setup["experiment_id"], setup["search"], trial_id)
        run_id = run.info.run_id if run else None
        scored = [(c, m) for c, m in result.best_checkpoints or [] if math.isfinite(m.get(metric, math.nan))]
        top = min(scored, key=lambda cm: cm[1][metric]) if scored else None
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
