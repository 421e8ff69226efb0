"""The register stage: the gate and each name's kind and data shape checked before anything is logged, the current
champion re-scored when it was scored otherwise, the model logged and registered with its metrics, and the election.
A run registers its generator (a GAN's G, a VAE's decoder) or its autoencoder (the ae family), and a semi-supervised
GAN also its classifier, each under its own name."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gan.config import Config
from gan.config_loader import config_hash
from gan.export import ServedClassifier, ServedEncoder, ServedGenerator, served_generator
from gan.scoring import (
    autoencoder_from_checkpoint,
    discriminator_from_checkpoint,
    generators_from_checkpoint,
    primary_generator,
)
from pipelines.model_registry import (
    AUTOENCODER,
    CHAMPION,
    CLASSIFIER,
    GENERATOR,
    KIND_TAG,
    PINNED,
    ModelKind,
    check_gate,
    check_kind,
    check_shape,
    elect_champion,
    git_commit,
    heldout_protocol,
    kind_of,
    model_name,
    pinned,
    rescored_tag,
    score_of,
    score_under,
    shape_tag,
    version_tags,
)
from pipelines.registered_scores import DECODER_URI, score_registered
from pipelines.stages import Context, metrics_line, run_stage
from pipelines.tracking import DatasetRef

Logger = Callable[[str, dict[str, str]], tuple[str, dict[str, str]]]
"""(the register run's id, the version's tags) -> the logged model's URI, and version tags learnt while logging."""


@dataclass
class Candidate:
    """A model the register stage registers: its kind and name, what it was scored with, and how it is logged."""

    kind: ModelKind
    name: str
    metrics: dict[str, float]
    """Its evaluation metrics (eval/...): the score among them, all logged with the model."""
    evaluator_id: str
    """The protocol its score was measured under (an evaluator's id, or a test split's)."""
    log: Logger
    tags: dict[str, str] = field(default_factory=dict)
    """Version tags of its own (which generator, its latent size)."""


def register_stage(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                   trained: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """Logs the scored model with `mlflow.pytorch.log_model`, registers it as a version of its model (one kind and one
    data shape per name) tagged with its metrics and lineage, and moves `champion` to it only if it beats the champion
    scored alike: the same evaluator, metric and sample count (else it is tagged `challenger`). A champion scored
    otherwise is re-scored first under this version's evaluator and protocol. `register.max_fid` and a name of
    another kind or data shape refuse a model before any of that. A semi-supervised GAN's classifier is registered
    the same way under its own name (its outputs prefixed classifier_)."""
    def body(run_id: str) -> dict[str, Any]:
        metrics = evaluated["metrics"]
        gens, trained_cfg, extra = generators_from_checkpoint(trained["checkpoint_dir"])
        kind = kind_of(trained_cfg)
        check_gate(cfg, metrics, kind)
        shape = shape_tag(extra["data_shape"])
        own = (_autoencoder(ctx, cfg, dataset, trained, evaluated) if kind is AUTOENCODER
               else _generator(ctx, cfg, dataset, evaluated, gens[primary_generator(trained_cfg)], trained_cfg, extra))
        candidates = [own] + ([_classifier(ctx, cfg, dataset, trained, evaluated, trained_cfg, extra)]
                              if trained_cfg.model.semi_supervised else [])
        for candidate in candidates:
            versions = ctx.tracker.model_versions(candidate.name)
            check_kind(versions, candidate.name, candidate.kind)
            check_shape(versions, candidate.name, shape)
        lineage = {"dataset_hash": dataset["dataset_hash"], "config_hash": config_hash(trained_cfg),
                   "git_commit": git_commit(), "data_shape": shape, "pipeline_run_id": ctx.parent_run_id}
        outs = [_register(ctx, cfg, dataset, evaluator, run_id, c, lineage) for c in candidates]
        out = {**outs[0], **{f"classifier_{k}": v for o in outs[1:] for k, v in o.items()}}
        ctx.tracker.set_note(run_id, "\n\n".join(o["decision"] for o in outs))
        ctx.tracker.set_tags(run_id, {k: str(v) for k, v in out.items() if not k.endswith("decision")})
        return out
    return run_stage(ctx, "register", body, tags={"dataset_hash": dataset["dataset_hash"]})


def _register(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any], run_id: str,
              candidate: Candidate, lineage: dict[str, str]) -> dict[str, Any]:
    """Re-scores the champion when needed, logs and registers `candidate`, elects, and describes the decision."""
    c = candidate
    tags = version_tags(c.metrics, c.kind, evaluator_id=c.evaluator_id, **lineage, **c.tags)
    rescored = rescore_champion(ctx, cfg, dataset, evaluator, c.name, tags, c.kind)
    # This run becomes the version's source run: it carries the logged model's evaluation metrics (eval/: eval_raw/
    # scores another network), linked to the logged model (the Models tab's columns).
    uri, learnt = c.log(run_id, tags)
    tags.update(learnt)
    version = ctx.tracker.register_model(uri, c.name, tags)
    previous = ctx.tracker.alias_version(c.name, CHAMPION)
    champion = elect_champion(ctx.tracker, c.name, version, auto=cfg.register.auto_champion)
    decision = registration_decision(c.metrics, c.evaluator_id, version, champion, previous,
                                     ctx.tracker.model_versions(c.name), rescored, c.kind)
    ctx.tracker.set_version_description(c.name, version, decision)
    ctx.log(f"[register] {c.name} version {version} ({tags['score_metric']}={float(tags['score']):.4g}): "
            f"{'the new champion' if champion == version else f'challenger; champion stays version {champion}'}")
    return {"model_name": c.name, "version": version, "model_uri": f"models:/{c.name}/{version}",
            "champion_version": champion, "champion_uri": f"models:/{c.name}@{CHAMPION}",
            "is_champion": champion == version, "decision": decision, "model_kind": c.kind.name, **learnt}


def _dataset_ref(dataset: dict[str, Any]) -> DatasetRef:
    return DatasetRef(dataset["dataset_id"], dataset["dataset_hash"], dataset["dataset_dir"])


def _eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("eval/")}


def _generator(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluated: dict[str, Any], G: Any,
               trained_cfg: Config, extra: dict[str, Any]) -> Candidate:
    """The scored generator G (G_ema or G; a VAE's decoder), logged with the evaluate run's sample grid."""
    module = served_generator(G, z_dim=trained_cfg.model.z_dim, points=trained_cfg.data.is_points,
                              scale=extra["scale"], conditional=trained_cfg.model.conditional,
                              num_classes=extra["num_classes"])

    def log(run_id: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
        with tempfile.TemporaryDirectory() as tmp:
            png = ctx.tracker.download_artifact(evaluated["run_id"], "samples.png", tmp)
            uri = ctx.tracker.log_model(
                run_id, module, module.example_inputs(),
                metadata={"points": module.points, "num_classes": module.num_classes,
                          "data_source": trained_cfg.data.source},
                metrics=_eval_metrics(evaluated["metrics"]), files=[png], tags=tags, dataset=_dataset_ref(dataset))
        return uri, {}
    return Candidate(GENERATOR, model_name(cfg, GENERATOR), evaluated["metrics"], evaluated["evaluator_id"], log,
                     {"generator": primary_generator(trained_cfg), "z_dim": str(trained_cfg.model.z_dim)})


def _autoencoder(ctx: Context, cfg: Config, dataset: dict[str, Any], trained: dict[str, Any],
                 evaluated: dict[str, Any]) -> Candidate:
    """The ae: its encoder is the registered model (images in [0, 1] -> codes), logged with the evaluate run's
    reconstructions; its decoder (codes -> images in [0, 1]) is logged beside it, named by the encoder's metadata and
    the version's tag `decoder_uri`."""
    encoder, decoder, trained_cfg, extra = autoencoder_from_checkpoint(trained["checkpoint_dir"])
    z_dim, source = trained_cfg.model.z_dim, trained_cfg.data.source
    served_encoder = ServedEncoder(encoder, data_shape=tuple(extra["data_shape"]), z_dim=z_dim)
    served_decoder = ServedGenerator(decoder, z_dim=z_dim, points=False)

    def log(run_id: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
        decoder_uri = ctx.tracker.log_model(
            run_id, served_decoder, served_decoder.example_inputs(), name="decoder",
            metadata={"points": False, "num_classes": 0, "data_source": source},
            tags={KIND_TAG: "decoder", "z_dim": str(z_dim)})
        with tempfile.TemporaryDirectory() as tmp:
            png = ctx.tracker.download_artifact(evaluated["run_id"], "samples.png", tmp)
            uri = ctx.tracker.log_model(
                run_id, served_encoder, served_encoder.example_inputs(), name="encoder",
                metadata={DECODER_URI: decoder_uri, "z_dim": z_dim, "data_source": source},
                metrics=_eval_metrics(evaluated["metrics"]), files=[png], tags={**tags, DECODER_URI: decoder_uri},
                dataset=_dataset_ref(dataset), input_names=("x",), output_name="code")
        return uri, {DECODER_URI: decoder_uri}
    return Candidate(AUTOENCODER, model_name(cfg, AUTOENCODER), evaluated["metrics"], evaluated["evaluator_id"], log,
                     {"z_dim": str(z_dim), "likelihood": trained_cfg.model.likelihood})


def _classifier(ctx: Context, cfg: Config, dataset: dict[str, Any], trained: dict[str, Any],
                evaluated: dict[str, Any], trained_cfg: Config, extra: dict[str, Any]) -> Candidate:
    """A semi-supervised GAN's K+1 D as a K-class classifier (images in [0, 1] -> class logits), scored by its test
    accuracy (with the plain classifier's from the same labels beside it)."""
    served = ServedClassifier(discriminator_from_checkpoint(trained["checkpoint_dir"]),
                              data_shape=tuple(extra["data_shape"]), num_classes=extra["num_classes"])
    metrics = {k: v for k, v in evaluated["metrics"].items() if re.fullmatch(r"eval/\w+_accuracy_\d+_labels", k)}

    def log(run_id: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
        return ctx.tracker.log_model(
            run_id, served, served.example_inputs(), name="classifier",
            metadata={"num_classes": served.num_classes, "data_source": trained_cfg.data.source}, metrics=metrics,
            tags=tags, dataset=_dataset_ref(dataset), input_names=("x",), output_name="logits"), {}
    return Candidate(CLASSIFIER, model_name(cfg, CLASSIFIER), metrics, heldout_protocol(dataset["dataset_hash"]), log,
                     {"labels": str(trained_cfg.model.labels)})


def rescore_champion(ctx: Context, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any], name: str,
                     tags: dict[str, str], kind: ModelKind = GENERATOR) -> str:
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
        metrics = score_registered(ctx.tracker, cfg, dataset, evaluator, f"models:/{name}/{champion}", kind, key)
        _, value = score_of(metrics, kind)
    except Exception as err:  # a champion that no longer loads or scores stays not comparable, and says why
        ctx.log(f"[register] could not re-score champion version {champion}: {type(err).__name__}: {err}")
        return f"The champion, version {champion}, could not be re-scored ({type(err).__name__}: {err})."
    ctx.tracker.set_version_tags(name, champion, {rescored_tag(evaluator_id, key): repr(value)})
    ctx.log(f"[register] champion version {champion} (scored as {was}) re-scored under evaluator {evaluator_id}: "
            f"{metrics_line({key: value})}")
    return (f"The champion, version {champion}, scored as {was}, was re-scored under evaluator `{evaluator_id}`: "
            f"`{key}` = {value:.4g}.")


def registration_decision(metrics: dict[str, float], evaluator_id: str, version: str, champion: str,
                          previous: str | None, versions: list[Any], rescored: str = "",
                          kind: ModelKind = GENERATOR) -> str:
    """Markdown for whoever chooses in the MLflow UI (the version's description, the pipeline run's note): the score
    against the real-data floor, and why the version is the champion or a challenger at registration (the reasons
    of `elect_champion`)."""
    key, value = score_of(metrics, kind)
    floor = next((k for k in sorted(metrics) if k.startswith("eval/fid_floor_")), None)
    against = f" against the real-data floor `{floor}` = {metrics[floor]:.4g}" if floor and kind is GENERATOR else ""
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
        elif not kind.beats(value, rival):
            why = f"it does not beat the champion, version {champion} (`{key}` = {rival:.4g})"
        else:
            why = f"it beats version {champion} (`{key}` = {rival:.4g}), but the alias moves only by hand " \
                  "(register.auto_champion is off)"
    # No emphasis: the registry's versions table shows descriptions as plain text.
    return (f"{verdict} at registration: `{key}` = {value:.4g}{against} (evaluator `{evaluator_id}`, {kind.order} is "
            f"better); {why}.{' ' + rescored if rescored else ''}")
