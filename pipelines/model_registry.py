"""Registering trained models of three kinds (generators, autoencoders, semi-supervised GANs' classifiers): the
registered name with its kind and data shape, the quality gate, version tags, and the `champion` alias, elected only
among versions scored alike (one evaluator or held-out split, one metric at one sample count), in the kind's
direction."""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gan.config import Config
from pipelines.tracking import Tracker

CHAMPION = "champion"
CHALLENGER = "challenger"
PINNED = "pinned"
"""A version tag: `pinned=true` on the champion (set by a person, e.g. in the MLflow UI) keeps the alias there."""
RESCORED = "rescored"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelKind:
    """What a registered model is, and the evaluation metric that ranks its versions."""

    name: str
    """The version tag `model_kind`: generator, autoencoder or classifier."""
    prefix: str
    """The default registered name's first word (gan-mnist-28px, ae-mnist-28px, classifier-mnist-28px)."""
    metrics: tuple[str, ...]
    """Patterns of the score's key among the evaluation metrics, the first found ranks."""
    wanted: str
    """The score's key as people read it (in errors)."""
    higher_is_better: bool = False

    @property
    def order(self) -> str:
        return "higher" if self.higher_is_better else "lower"

    def beats(self, a: float, b: float) -> bool:
        """Whether score `a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b


GENERATOR = ModelKind("generator", "gan", (r"eval/fid_\d+k?", "eval/mode_gap"), "eval/fid_<n> or eval/mode_gap")
"""GANs and VAE decoders: samples from the prior, ranked by FID (the mode gap for 2-D data)."""
AUTOENCODER = ModelKind("autoencoder", "ae", ("eval/reconstruction_error",), "eval/reconstruction_error")
"""The ae family, a dimensionality reducer: its reconstructions of real images are not samples, so it never joins
the generators' election; ranked by its held-out reconstruction error."""
CLASSIFIER = ModelKind("classifier", "classifier", (r"eval/sgan_accuracy_\d+_labels",),
                       "eval/sgan_accuracy_<labels>_labels", higher_is_better=True)
"""A semi-supervised GAN's K+1 discriminator as a K-class classifier, ranked by its test accuracy (the label budget
in the key, so classifiers trained from different numbers of labels do not compete)."""
KINDS = {kind.name: kind for kind in (GENERATOR, AUTOENCODER, CLASSIFIER)}
KIND_TAG = "model_kind"


def kind_of(cfg: Config) -> ModelKind:
    """The kind of model a run trains (its semi-supervised GAN's classifier aside)."""
    return AUTOENCODER if cfg.model.family == "ae" else GENERATOR


def heldout_protocol(dataset_hash: str) -> str:
    """The `evaluator_id` of a score measured on a dataset's test split itself (reconstruction error, accuracy): the
    split is the protocol, named by the dataset's content hash."""
    return f"test-split-{dataset_hash[:12]}"


class GateError(RuntimeError):
    """The model fails `register.max_fid`; nothing is registered."""


class ShapeError(RuntimeError):
    """The registered name holds generators of another data shape, or models of another kind; nothing is
    registered."""


def model_name(cfg: Config, kind: ModelKind = GENERATOR) -> str:
    """`register.model_name` for the run's own model (a classifier appends -classifier to it), else
    <prefix>-<data.source>, with the image side for images (gan-digits-28px, ae-digits-28px) and -conditional for a
    generator that takes labels (gan-digits-28px-conditional): models of different kinds, data shapes or inputs are
    different models."""
    if cfg.register.model_name:
        return cfg.register.model_name + ("-classifier" if kind is CLASSIFIER else "")
    source = cfg.data.source
    name = f"{kind.prefix}-{source}" if cfg.data.is_points else f"{kind.prefix}-{source}-{cfg.data.resolution}px"
    return name + ("-conditional" if kind is GENERATOR and cfg.model.conditional else "")


def shape_tag(data_shape: list[int] | tuple[int, ...]) -> str:
    """A data shape as a version tag: 1x28x28, 2."""
    return "x".join(str(int(d)) for d in data_shape)


def check_shape(versions: list[Any], name: str, data_shape: str) -> None:
    """Raises ShapeError when a version of `name` holds another data shape (the tag `data_shape`)."""
    other = sorted({v.tags["data_shape"] for v in versions if v.tags.get("data_shape", data_shape) != data_shape})
    if other:
        raise ShapeError(f"not registered: {name} holds generators of data shape {', '.join(other)}, this one is "
                         f"{data_shape}; register it under another name (register.model_name)")


def check_kind(versions: list[Any], name: str, kind: ModelKind) -> None:
    """Raises ShapeError when a version of `name` is another kind of model (the tag `model_kind`; generator when
    absent): an autoencoder or a classifier never competes in a generators' election, nor the other way round."""
    other = sorted({v.tags.get(KIND_TAG, GENERATOR.name) for v in versions} - {kind.name})
    if other:
        article = "an" if kind.name[0] in "aeiou" else "a"
        raise ShapeError(f"not registered: {name} holds {' and '.join(other)} models, this one is {article} "
                         f"{kind.name}; register it under another name (register.model_name)")


def score_of(metrics: dict[str, float], kind: ModelKind = GENERATOR) -> tuple[str, float]:
    """The number that ranks versions of `kind`, in its direction. Generators: the FID for images (`eval/fid_<n>`,
    its sample count in the name), the mode gap for 2-D data (quality and balance over the modes together), lower is
    better; autoencoders: the held-out reconstruction error, lower; classifiers: the test accuracy, higher."""
    for pattern in kind.metrics:
        found = sorted(k for k in metrics if re.fullmatch(pattern, k))
        if found:
            return found[0], metrics[found[0]]
    raise KeyError(f"no {kind.wanted} among the evaluation metrics {sorted(metrics)}")


def rescored_tag(evaluator_id: str, metric: str) -> str:
    """The version tag holding a version's score re-computed under another evaluator or protocol."""
    return f"{RESCORED}/{evaluator_id}/{metric}"


def score_under(tags: dict[str, str], evaluator_id: str, metric: str) -> float | None:
    """A version's score under `evaluator_id` and `metric` (its own, or a re-score), None when it has none."""
    if tags.get("evaluator_id") == evaluator_id and tags.get("score_metric") == metric and "score" in tags:
        return float(tags["score"])
    rescored = tags.get(rescored_tag(evaluator_id, metric))
    return float(rescored) if rescored is not None else None


def check_gate(cfg: Config, metrics: dict[str, float], kind: ModelKind = GENERATOR) -> None:
    """Raises GateError when `register.max_fid` is set and a generator's score exceeds it (the gate is for
    generators)."""
    if kind is not GENERATOR:
        return
    key, value = score_of(metrics)
    if cfg.register.max_fid and not value <= cfg.register.max_fid:
        raise GateError(f"not registered: {key}={value:.4g} fails the gate register.max_fid={cfg.register.max_fid:g}")


def version_tags(metrics: dict[str, float], kind: ModelKind = GENERATOR, **lineage: str) -> dict[str, str]:
    """Tags of a registered version: its kind, score (and which way is better), FID/IS/KID/precision/recall (or the
    2-D mode metrics, the reconstruction error, the accuracies) and lineage."""
    key, value = score_of(metrics, kind)
    tags = {KIND_TAG: kind.name, "score_metric": key, "score": repr(value), "score_order": kind.order,
            **{k: str(v) for k, v in lineage.items()}}
    patterns = {name: rf"eval/{name}_\d+k?" for name in ("fid", "is", "kid", "precision", "recall")}
    patterns.update(accuracy=r"eval/sgan_accuracy_\d+_labels", plain_accuracy=r"eval/plain_accuracy_\d+_labels")
    for name, pattern in patterns.items():
        found = [k for k in metrics if re.fullmatch(pattern, k)]
        if found:
            tags[name] = repr(metrics[found[0]])
    for name in ("modes_covered", "high_quality", "reverse_kl", "mode_gap", "reconstruction_error",
                 "reconstruction_bce"):
        if f"eval/{name}" in metrics:
            tags[name] = repr(metrics[f"eval/{name}"])
    return tags


def git_commit() -> str:
    """The project's commit (with -dirty for local changes); $RAYGAN_GIT_COMMIT on a cluster, where the
    submitted working directory has no .git."""
    if os.environ.get("RAYGAN_GIT_COMMIT"):
        return os.environ["RAYGAN_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _best(versions: list[Any], evaluator_id: str, metric: str, kind: ModelKind = GENERATOR) -> str | None:
    """The version with the best score under `evaluator_id` and `metric` (the lowest, or the highest for a kind where
    higher is better); the older one wins a tie."""
    sign = -1.0 if kind.higher_is_better else 1.0
    scored = [(sign * score, int(v.version)) for v in versions
              if (score := score_under(v.tags, evaluator_id, metric)) is not None]
    return str(min(scored)[1]) if scored else None


def pinned(versions: list[Any], champion: str | None) -> bool:
    """Whether the champion version carries `pinned=true`."""
    return any(str(v.version) == champion and v.tags.get(PINNED, "").lower() == "true" for v in versions)


def elect_champion(tracker: Tracker, name: str, version: str, *, auto: bool = True, settle_rounds: int = 4) -> str:
    """Points `champion` at the best version scored like `version` (same evaluator, same metric and sample count, in
    the direction of its kind, the tag `model_kind`) and tags `version` challenger when it is not the one. Once there
    is a champion, the alias stays where it is when the champion is pinned, `auto` is off (register.auto_champion),
    or the champion has no score under this protocol: the register stage re-scores it first (a `rescored/...`
    tag) when the data shape allows.

    MLflow has no transactions, so concurrent pipelines could each read a stale champion. Every registrant
    recomputes the best over all versions and re-checks after a pause until the alias stops moving: whoever
    looks last sees every version, so they converge on the same champion."""
    best = None
    for _ in range(settle_rounds):
        versions = tracker.model_versions(name)
        current = tracker.alias_version(name, CHAMPION)
        tags = {str(v.version): v.tags for v in versions}
        protocol = tags[version]["evaluator_id"], tags[version]["score_metric"]
        kind = KINDS[tags[version].get(KIND_TAG, GENERATOR.name)]
        if current is not None and (not auto or pinned(versions, current)
                                    or score_under(tags.get(current, {}), *protocol) is None):
            best = current  # kept by a person, or not comparable (the register stage re-scores it first)
            break
        best = _best(versions, *protocol, kind) or version
        if best == current:
            break
        tracker.set_alias(name, CHAMPION, best)
        time.sleep(0.2 + 0.3 * random.random())
    if best != version:
        tracker.set_version_tags(name, version, {CHALLENGER: "true"})
    return str(best)
