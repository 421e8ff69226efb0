"""Registering generators: the registered name and its data shape, the quality gate, version tags, and the
`champion` alias, elected only among versions scored alike (one evaluator, one metric at one sample count)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
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


class GateError(RuntimeError):
    """The model fails `register.max_fid`; nothing is registered."""


class ShapeError(RuntimeError):
    """The registered name holds generators of another data shape; nothing is registered."""


def model_name(cfg: Config) -> str:
    """`register.model_name`, else gan-<data.source>, with the image side for images (gan-digits-28px): generators
    of different data shapes are different models."""
    if cfg.register.model_name:
        return cfg.register.model_name
    return f"gan-{cfg.data.source}" if cfg.data.is_points else f"gan-{cfg.data.source}-{cfg.data.resolution}px"


def shape_tag(data_shape: list[int] | tuple[int, ...]) -> str:
    """A data shape as a version tag: 1x28x28, 2."""
    return "x".join(str(int(d)) for d in data_shape)


def check_shape(versions: list[Any], name: str, data_shape: str) -> None:
    """Raises ShapeError when a version of `name` holds another data shape (the tag `data_shape`)."""
    other = sorted({v.tags["data_shape"] for v in versions if v.tags.get("data_shape", data_shape) != data_shape})
    if other:
        raise ShapeError(f"not registered: {name} holds generators of data shape {', '.join(other)}, this one is "
                         f"{data_shape}; register it under another name (register.model_name)")


def score_of(metrics: dict[str, float]) -> tuple[str, float]:
    """The lower-is-better number that ranks versions: the registered generator's FID for images (`eval/fid_<n>`,
    its sample count in the name), the mode gap for 2-D data (quality and balance over the modes together)."""
    fid = sorted(k for k in metrics if re.fullmatch(r"eval/fid_\d+k?", k))
    if fid:
        return fid[0], metrics[fid[0]]
    if "eval/mode_gap" in metrics:
        return "eval/mode_gap", metrics["eval/mode_gap"]
    raise KeyError(f"no eval/fid_<n> or eval/mode_gap among the evaluation metrics {sorted(metrics)}")


def rescored_tag(evaluator_id: str, metric: str) -> str:
    """The version tag holding a version's score re-computed under another evaluator or protocol."""
    return f"{RESCORED}/{evaluator_id}/{metric}"


def score_under(tags: dict[str, str], evaluator_id: str, metric: str) -> float | None:
    """A version's score under `evaluator_id` and `metric` (its own, or a re-score), None when it has none."""
    if tags.get("evaluator_id") == evaluator_id and tags.get("score_metric") == metric and "score" in tags:
        return float(tags["score"])
    rescored = tags.get(rescored_tag(evaluator_id, metric))
    return float(rescored) if rescored is not None else None


def check_gate(cfg: Config, metrics: dict[str, float]) -> None:
    """Raises GateError when `register.max_fid` is set and the score exceeds it."""
    key, value = score_of(metrics)
    if cfg.register.max_fid and not value <= cfg.register.max_fid:
        raise GateError(f"not registered: {key}={value:.4g} fails the gate register.max_fid={cfg.register.max_fid:g}")


def version_tags(metrics: dict[str, float], **lineage: str) -> dict[str, str]:
    """Tags of a registered version: score, FID/IS/KID/precision/recall (or the 2-D mode metrics) and lineage."""
    key, value = score_of(metrics)
    tags = {"score_metric": key, "score": repr(value), **{k: str(v) for k, v in lineage.items()}}
    for name in ("fid", "is", "kid", "precision", "recall"):
        found = [k for k in metrics if re.fullmatch(rf"eval/{name}_\d+k?", k)]
        if found:
            tags[name] = repr(metrics[found[0]])
    for name in ("modes_covered", "high_quality", "reverse_kl", "mode_gap"):
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


def _best(versions: list[Any], evaluator_id: str, metric: str) -> str | None:
    """The version with the lowest score under `evaluator_id` and `metric`; the older one wins a tie."""
    scored = [(score, int(v.version)) for v in versions
              if (score := score_under(v.tags, evaluator_id, metric)) is not None]
    return str(min(scored)[1]) if scored else None


def pinned(versions: list[Any], champion: str | None) -> bool:
    """Whether the champion version carries `pinned=true`."""
    return any(str(v.version) == champion and v.tags.get(PINNED, "").lower() == "true" for v in versions)


def elect_champion(tracker: Tracker, name: str, version: str, *, auto: bool = True, settle_rounds: int = 4) -> str:
    """Points `champion` at the best version scored like `version` (same evaluator, same metric and sample count)
    and tags `version` challenger when it is not the one. Once there is a champion, the alias stays where it is
    when the champion is pinned, `auto` is off (register.auto_champion), or the champion has no score under this
    protocol: the register stage re-scores it first (a `rescored/...` tag) when the data shape allows.

    MLflow has no transactions, so concurrent pipelines could each read a stale champion. Every registrant
    recomputes the best over all versions and re-checks after a pause until the alias stops moving: whoever
    looks last sees every version, so they converge on the same champion."""
    best = None
    for _ in range(settle_rounds):
        versions = tracker.model_versions(name)
        current = tracker.alias_version(name, CHAMPION)
        tags = {str(v.version): v.tags for v in versions}
        protocol = tags[version]["evaluator_id"], tags[version]["score_metric"]
        if current is not None and (not auto or pinned(versions, current)
                                    or score_under(tags.get(current, {}), *protocol) is None):
            best = current  # kept by a person, or not comparable (the register stage re-scores it first)
            break
        best = _best(versions, *protocol) or version
        if best == current:
            break
        tracker.set_alias(name, CHAMPION, best)
        time.sleep(0.2 + 0.3 * random.random())
    if best != version:
        tracker.set_version_tags(name, version, {CHALLENGER: "true"})
    return str(best)
