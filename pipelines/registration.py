"""The register stage: the gate and the name's data shape checked before anything is logged, the current champion
re-scored when it was scored otherwise, the generator logged and registered with its metrics, and the election."""

from __future__ import annotations

import tempfile
from typing import Any

from gan.config import Config
from gan.config_loader import config_hash
from gan.export import served_generator
from gan.scoring import generators_from_checkpoint, primary_generator
from pipelines.model_registry import (
    CHAMPION,
    PINNED,
    check_gate,
    check_shape,
    elect_champion,
    git_commit,
    model_name,
    pinned,
    rescored_tag,
    score_of,
    score_under,
    shape_tag,
    version_tags,
)
from pipelines.stages import Context, metrics_line, run_stage, score_model
from pipelines.tracking import DatasetRef


def register_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                   trained: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """Logs the scored generator with `mlflow.pytorch.log_model`, registers it as a version of its model (one data
    shape per name) tagged with its metrics and lineage, and moves `champion` to it only if it beats the champion
    scored alike: the same evaluator, metric and sample count (else it is tagged `challenger`). A champion scored
    otherwise is re-scored first under this version's evaluator and protocol. `register.max_fid` and a name of
    another data shape refuse a model before any of that."""
    def body(run_id: str) -> dict[str, Any]:
        metrics = evaluated["metrics"]
        check_gate(cfg, metrics)
        gens, trained_cfg, extra = generators_from_checkpoint(trained["checkpoint_dir"])
        name, shape = model_name(cfg), shape_tag(extra["data_shape"])
        check_shape(ctx.tracker.model_versions(name), name, shape)
        primary = primary_generator(trained_cfg)
        module = served_generator(gens[primary], z_dim=trained_cfg.model.z_dim, points=trained_cfg.data.is_points,
                                  scale=extra["scale"], conditional=trained_cfg.model.conditional,
                                  num_classes=extra["num_classes"])
        tags = version_tags(metrics, evaluator_id=evaluated["evaluator_id"], dataset_hash=dataset["dataset_hash"],
                            config_hash=config_hash(trained_cfg), git_commit=git_commit(), data_shape=shape,
                            pipeline_run_id=ctx.parent_run_id, generator=primary, z_dim=str(trained_cfg.model.z_dim))
        rescored = rescore_champion(ctx, cfg, dataset, evaluator, name, tags)
        # This run becomes the version's source run: it carries the logged generator's evaluation metrics (eval/:
        # eval_raw/ scores another network), linked to the logged model (the Models tab's columns), with the evaluate
        # run's sample grid among the model's artifacts.
        with tempfile.TemporaryDirectory() as tmp:
            png = ctx.tracker.download_artifact(evaluated["run_id"], "samples.png", tmp)
            uri = ctx.tracker.log_generator(
                run_id, module, module.example_inputs(),
                metadata={"points": module.points, "num_classes": module.num_classes,
                          "data_source": trained_cfg.data.source},
                metrics={k: v for k, v in metrics.items() if k.startswith("eval/")}, files=[png], tags=tags,
                dataset=DatasetRef(dataset["dataset_id"], dataset["dataset_hash"], dataset["dataset_dir"]))
        version = ctx.tracker.register_model(uri, name, tags)
        previous = ctx.tracker.alias_version(name, CHAMPION)
        champion = elect_champion(ctx.tracker, name, version, auto=cfg.register.auto_champion)
        decision = registration_decision(metrics, evaluated["evaluator_id"], version, champion, previous,
                                         ctx.tracker.model_versions(name), rescored)
        ctx.tracker.set_version_description(name, version, decision)
        ctx.tracker.set_note(run_id, decision)
        out = {"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
               "champion_version": champion, "champion_uri": f"models:/{name}@{CHAMPION}",
               "is_champion": champion == version, "decision": decision}
        ctx.tracker.set_tags(run_id, {k: str(v) for k, v in out.items() if k != "decision"})
        ctx.log(f"[register] {name} version {version} ({tags['score_metric']}={float(tags['score']):.4g}): "
                f"{'the new champion' if champion == version else f'challenger; champion stays version {champion}'}")
        return out
    return run_stage(ctx, "register", body, tags={"dataset_hash": dataset["dataset_hash"]})




def rescore_champion(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any], name: str,
                     tags: dict[str, str]) -> str:
    """Scores the current champion under the new version's evaluator and protocol when it has no score there (its
    data shape is this one: `check_shape` passed), and records it on the champion as a `rescored/...` tag, so the
    election can compare like with like. Returns a sentence for the decision ('' when nothing was re-scored)."""
    champion = ctx.tracker.alias_version(name, CHAMPION)
    versions = {str(v.version): v for v in ctx.tracker.model_versions(name)}
    evaluator_id, key = tags["evaluator_id"], tags["score_metric"]
    if champion not in versions or score_under(versions[champion].tags, evaluator_id, key) is not None:
        return ""
    old = versions[champion].tags
    was = f"`{old.get('score_metric')}` under evaluator `{old.get('evaluator_id')}`"
    try:
        metrics = score_model(ctx.tracker, cfg, dataset, evaluator, f"models:/{name}/{champion}")
        _, value = score_of(metrics)
    except Exception as err:  # a champion that no longer loads or scores stays not comparable, and says why
        ctx.log(f"[register] could not re-score champion version {champion}: {type(err).__name__}: {err}")
        return f"The champion, version {champion}, could not be re-scored ({type(err).__name__}: {err})."
    ctx.tracker.set_version_tags(name, champion, {rescored_tag(evaluator_id, key): repr(value)})
    ctx.log(f"[register] champion version {champion} (scored as {was}) re-scored under evaluator {evaluator_id}: "
            f"{metrics_line({key: value})}")
    return (f"The champion, version {champion}, scored as {was}, was re-scored under evaluator `{evaluator_id}`: "
            f"`{key}` = {value:.4g}.")


def registration_decision(metrics: dict[str, float], evaluator_id: str, version: str, champion: str,
                          previous: str | None, versions: list[Any], rescored: str = "") -> str:
    """Markdown for whoever chooses in the MLflow UI (the version's description, the pipeline run's note): the score
    against the real-data floor, and why the version is the champion or a challenger at registration (the reasons
    of `elect_champion`)."""
    key, value = score_of(metrics)
    floor = next((k for k in sorted(metrics) if k.startswith("eval/fid_floor_")), None)
    against = f" against the real-data floor `{floor}` = {metrics[floor]:.4g}" if floor else ""
    tags = {str(v.version): v.tags for v in versions}
    rival = score_under(tags.get(previous if champion == version else champion, {}), evaluator_id, key)
    if champion == version:
        verdict = "Champion"
        why = (f"it beats version {previous}, the champion until then (`{key}` = {rival:.4g})"
               if previous not in (None, version) and rival is not None else "there was no comparable champion")
    else:
        verdict = "Challenger"
        if pinned(versions, champion):
            why = f"the champion, version {champion}, is pinned (its `{PINNED}` tag)"
        elif rival is None:
            why = (f"the champion, version {champion}, has no `{key}` under evaluator `{evaluator_id}`: versions "
                   "compete only when scored alike")
        elif rival <= value:
            why = f"it does not beat the champion, version {champion} (`{key}` = {rival:.4g})"
        else:
            why = f"it beats version {champion} (`{key}` = {rival:.4g}), but the alias moves only by hand " \
                  "(register.auto_champion is off)"
    # No emphasis: the registry's versions table shows descriptions as plain text.
    return (f"{verdict} at registration: `{key}` = {value:.4g}{against} (evaluator `{evaluator_id}`, lower is "
            f"better); {why}.{' ' + rescored if rescored else ''}")


