"""Registering generators: the quality gate, version tags, and the `champion` alias by FID under one evaluator."""

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
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class GateError(RuntimeError):
    """The model fails `register.max_fid`; nothing is registered."""


def model_name(cfg: Config) -> str:
    """`register.model_name`, else gan-<data.source>."""
    return cfg.register.model_name or f"gan-{cfg.data.source}"


def score_of(metrics: dict[str, float]) -> tuple[str, float]:
    """The lower-is-better number that ranks versions: the registered generator's FID for images (`eval/fid_<n>`),
    the reverse KL over the modes for 2-D data."""
    fid = sorted(k for k in metrics if re.fullmatch(r"eval/fid_\d+k?", k))
    if fid:
        return fid[0], metrics[fid[0]]
    if "eval/reverse_kl" in metrics:
        return "eval/reverse_kl", metrics["eval/reverse_kl"]
    raise KeyError(f"no eval/fid_<n> or eval/reverse_kl among the evaluation metrics {sorted(metrics)}")


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
    for name in ("modes_covered", "high_quality", "reverse_kl"):
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


def _best(versions: list[Any], evaluator_id: str) -> str | None:
    """The version with the lowest score among those scored by `evaluator_id`; the older one wins a tie."""
    scored = [(float(v.tags["score"]), int(v.version)) for v in versions
              if v.tags.get("evaluator_id") == evaluator_id and "score" in v.tags]
    return str(min(scored)[1]) if scored else None


def elect_champion(tracker: Tracker, name: str, version: str, *, settle_rounds: int = 4) -> str:
    """Points `champion` at the best version under the current champion's evaluator (the new version's when
    there is no champion yet) and tags `version` challenger when it is not the one.

    MLflow has no transactions, so concurrent pipelines could each read a stale champion. Every registrant
    recomputes the best over all versions and re-checks after a pause until the alias stops moving: whoever
    looks last sees every version, so they converge on the same champion."""
    best = None
    for _ in range(settle_rounds):
        versions = tracker.model_versions(name)
        current = tracker.alias_version(name, CHAMPION)
        by_version = {str(v.version): v for v in versions}
        group = by_version[current].tags.get("evaluator_id") if current in by_version else \
            by_version[version].tags.get("evaluator_id")
        best = _best(versions, group) or version
        if best == current:
            break
        tracker.set_alias(name, CHAMPION, best)
        time.sleep(0.2 + 0.3 * random.random())
    if best != version:
        tracker.set_version_tags(name, version, {CHALLENGER: "true"})
    return str(best)
