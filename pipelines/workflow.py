"""The pipeline as a workflow on Ray: every stage a Ray task with retries and a nested MLflow run; a stage whose
inputs match a FINISHED run is reused, and a re-run after a crash resumes (train from its Ray checkpoint)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gan import storage
from gan.config import Config
from gan.config_loader import flatten, from_dict, to_dict
from gan.data import DatasetError, load_manifest, verify
from pipelines.registration import register_stage
from pipelines.stages import (
    Context,
    StageError,
    evaluate_model_stage,
    evaluate_stage,
    evaluator_inputs,
    evaluator_stage,
    prepare_stage,
    train_stage,
)
from pipelines.storage_probe import check_storage
from pipelines.tracking import DatasetRef, Tracker, default_tracking_uri


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline."""

    name: str
    run: Callable[..., dict[str, Any]]
    """The stage function (pipelines/stages.py): (ctx, cfg, **the upstream stages' outputs by their `output`)."""
    upstream: tuple[str, ...]
    """The stages whose outputs it takes."""
    output: str
    """What its outputs are called: a later stage's argument, and a key of run_pipeline's result."""
    cpus: float = 1.0
    """CPUs its Ray task reserves: train and register only wait on work that reserves its own (Train workers, Tune
    trials, the MLflow server)."""
    gpu: bool = False
    """Whether its Ray task also reserves a GPU when scale.use_gpu (the evaluator trains, and generators are
    scored, on it)."""


STAGES = {s.name: s for s in (
    Stage("prepare", prepare_stage, (), "dataset"),
    Stage("evaluator", evaluator_stage, ("prepare",), "evaluator", gpu=True),
    Stage("train", train_stage, ("prepare", "evaluator"), "trained", cpus=0.0),
    Stage("evaluate", evaluate_stage, ("prepare", "evaluator", "train"), "evaluated", gpu=True),
    Stage("register", register_stage, ("prepare", "evaluator", "train", "evaluate"), "registered", cpus=0.0),
)}
STAGE_RETRIES = 2
"""Retries of a stage task whose worker process died (a raised error is not retried: it would fail again)."""


def stage_key(name: str, *parts: Any) -> str:
    """Hash of a stage's inputs: its config sections and the identifying outputs of the stages before it."""
    return hashlib.sha256(json.dumps([name, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_inputs(cfg: Config, name: str, upstream: dict[str, dict[str, Any]]) -> list[Any]:
    """What decides a stage's result; two runs with equal inputs give the same outputs."""
    plain = to_dict(cfg)
    if name == "prepare":
        return [{k: v for k, v in plain["data"].items() if k != "cache_mb"}]
    dataset_hash = upstream["prepare"]["dataset_hash"]
    if name == "evaluator":
        return evaluator_inputs(cfg, dataset_hash)
    if name == "train":
        training = {k: v for k, v in plain.items() if k not in ("name", "data", "eval", "register")}
        return [dataset_hash, upstream["evaluator"].get("evaluator_id"), training]
    if name == "evaluate":
        return [upstream["train"]["checkpoint_dir"], upstream["evaluator"].get("evaluator_id"), plain["eval"]]
    if name == "register":
        return [upstream["evaluate"]["run_id"], plain["register"], plain["data"]["source"]]
    raise KeyError(name)


def _unusable(name: str, outputs: dict[str, Any]) -> str | None:
    """Why a FINISHED stage's outputs cannot be reused (None when they can): a folder or object it names is gone
    from storage (a cleaned work folder or bucket means running it again), or a dataset fails its checksums."""
    for key, value in outputs.items():
        if key.endswith("_dir") and isinstance(value, str) and not storage.exists(value):
            return f"{key} {value} is missing"
    if name == "prepare":
        try:
            verify(load_manifest(outputs["dataset_dir"]))
        except DatasetError as err:
            return str(err)
    return None


@ray.remote
def _stage_task(name: str, cfg_values: dict[str, Any], upstream: dict[str, dict[str, Any]],
                ctx_values: dict[str, Any]) -> dict[str, Any]:
    ctx = Context(workdir=Path(ctx_values["workdir"]), tracker=Tracker(ctx_values["tracking_uri"]),
                  experiment=ctx_values["experiment"], parent_run_id=ctx_values["parent_run_id"],
                  stage_key=ctx_values["stage_key"], storage=ctx_values["storage"])
    cfg = from_dict(cfg_values)
    return STAGES[name].run(ctx, cfg, **upstream)


def run_stage_task(ctx: Context, cfg: Config, name: str, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Reuses a FINISHED run with the same inputs, or runs the stage as a Ray task (its own nested run)."""
    # The storage root is an input: outputs under another root are not reused (every location stays under it).
    key = stage_key(name, ctx.location(), *stage_inputs(cfg, name, done))
    for run in ctx.tracker.find_runs(ctx.experiment, {"stage": name, "stage_key": key}, status="FINISHED"):
        outputs = json.loads(run.data.tags.get("outputs", "null") or "null")
        why = _unusable(name, outputs) if outputs is not None else "it recorded no outputs"
        if why is not None:
            ctx.log(f"[{name}] not reusing run {run.info.run_id}: {why}")
        else:
            ctx.log(f"[{name}] reused: inputs match FINISHED run {ctx.tracker.run_url(run.info.run_id)}")
            ctx.tracker.set_tags(ctx.parent_run_id, {f"stage.{name}": run.info.run_id, f"reused.{name}": "true"})
            return {**outputs, "run_id": run.info.run_id}
    stage = STAGES[name]
    upstream = {STAGES[u].output: done[u] for u in stage.upstream}
    ctx_values = {"workdir": str(ctx.workdir), "tracking_uri": ctx.tracker.tracking_uri, "experiment": ctx.experiment,
                  "parent_run_id": ctx.parent_run_id, "stage_key": key, "storage": ctx.location()}
    placement = {}
    if stage.cpus == 0:
        # A stage that reserves no CPU could land on any node, and Ray Train attaches its controller to the node
        # that calls fit(): on the driver's node, losing a worker node does not take the run's controller with it.
        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                          soft=True)
    task = _stage_task.options(num_cpus=stage.cpus, num_gpus=1 if stage.gpu and cfg.scale.use_gpu else 0,
                               max_retries=STAGE_RETRIES, retry_exceptions=False,
                               name=f"stage-{name}", **placement)
    ref = task.remote(name, to_dict(cfg), upstream, ctx_values)
    ctx.log(f"[{name}] running as a Ray task (inputs {key})")
    try:
        out = ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        raise (cause if isinstance(cause, StageError) else StageError(f"stage {name} failed: {cause}")) from None
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    ctx.tracker.set_tags(ctx.parent_run_id, {f"stage.{name}": out["run_id"]})
    return out


def absolute_paths(cfg: Config) -> Config:
    """Stage tasks may start in another folder (or on another node): a relative data.root is made absolute."""
    return replace(cfg, data=replace(cfg.data, root=str(Path(cfg.data.root).resolve()) if cfg.data.root else ""))


def run_pipeline(cfg: Config, workdir: str | Path, *, storage_root: str | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """prepare -> evaluator -> train -> evaluate -> register under one pipeline run. Needs a connected Ray.

    Everything the stages produce goes under `storage_root` (a local folder or a URI; default `workdir`), checked
    from every node before any stage runs; `workdir` keeps the SQLite MLflow store when no server is given."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = storage.normalize(storage_root or workdir)
    check_storage(root, log=log)
    cfg = absolute_paths(cfg)
    tracker = Tracker(default_tracking_uri(workdir))
    parent = tracker.start_run(cfg.name, f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"stage": "pipeline", "storage": root})
    tracker.log_params(parent, flatten(cfg))
    log(f"[pipeline] {cfg.name}: storage {root}, MLflow store {tracker.tracking_uri}, run {tracker.run_url(parent)}")
    ctx = Context(workdir=workdir, tracker=tracker, experiment=cfg.name, parent_run_id=parent, log=log, storage=root)
    done: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    with tracker.ending(parent):
        for name in STAGES:
            done[name] = run_stage_task(ctx, cfg, name, done)
        record_outcome(tracker, parent, done)
    log(f"[pipeline] finished in {time.perf_counter() - start:.1f}s")
    return {"pipeline_run_id": parent, **{STAGES[n].output: v for n, v in done.items()}}


def dataset_ref(dataset: dict[str, Any]) -> DatasetRef:
    """The prepare stage's dataset as an MLflow dataset: its id, content hash, shards' location and split counts."""
    m = load_manifest(dataset["dataset_dir"])
    profile = {"kind": m.kind, "shape": list(m.shape), **{f"{split}_count": m.count(split) for split in m.splits}}
    return DatasetRef(m.dataset_id, m.dataset_hash, str(dataset["dataset_dir"]), profile)


def record_outcome(tracker: Tracker, run_id: str, done: dict[str, dict[str, Any]]) -> None:
    """What the pipeline run shows in the MLflow UI: the final evaluation metrics (sample counts in their names,
    with the real-data floor), the prepared dataset as its input, and a description saying what was registered
    and why it is the champion or a challenger."""
    evaluated, registered = done["evaluate"], done["register"]
    tracker.log_metrics(run_id, {k: v for k, v in evaluated["metrics"].items() if not k.startswith("perf/")}, step=0)
    tracker.log_dataset(run_id, dataset_ref(done["prepare"]))
    verdict = "champion" if registered["is_champion"] else "challenger"
    # Outputs of a register run from before decisions were recorded carry no "decision".
    decision = registered.get("decision") or f"{verdict.capitalize()} at registration."
    tracker.set_note(run_id, "\n\n".join([
        f"### {registered['model_name']} version {registered['version']}: {verdict}", decision,
        f"Load it with `{registered['model_uri']}`, the current champion with `{registered['champion_uri']}`. "
        f"Trained and scored on `{done['prepare']['dataset_id']}`."]))


def evaluate_registered(cfg: Config, workdir: str | Path, model_uri: str, *, storage_root: str | None = None,
                        log: Callable[[str], None] = print, device: str = "cpu") -> dict[str, Any]:
    """Scores a registered (or logged) generator on `cfg`'s data and evaluator: prepare and evaluator are reused
    from earlier runs when their inputs match (and their outputs are still under `storage_root`), then the model is
    scored in its own MLflow run, on `device`."""
    workdir = Path(workdir).resolve()
    root = storage.normalize(storage_root or workdir)
    check_storage(root, log=log)
    cfg = absolute_paths(cfg)
    tracker = Tracker(default_tracking_uri(workdir))
    parent = tracker.start_run(cfg.name, f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"stage": "pipeline", "model_uri": model_uri, "storage": root})
    ctx = Context(workdir=workdir, tracker=tracker, experiment=cfg.name, parent_run_id=parent, log=log, storage=root)
    with tracker.ending(parent):
        done: dict[str, dict[str, Any]] = {}
        for name in ("prepare", "evaluator"):
            done[name] = run_stage_task(ctx, cfg, name, done)
        out = evaluate_model_stage(ctx, cfg, done["prepare"], done["evaluator"], model_uri, device=device)
    return out
