"""The `tune:` section: a Ray Tune search over dotted config keys, each entry checked against the key's type when
the config loads (no ray here: pipelines/ray_tune.py turns the section into Tune's objects)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gan.config_checks import ConfigError, coerce, value_at, with_values
from gan.config_checks import check as _check

SCHEDULERS = ("asha", "pbt", "fifo")
SPEC_KINDS = ("loguniform", "uniform", "randint", "choice")
PBT_MUTABLE = ("optim.lr_g", "optim.lr_d")
UNSEARCHABLE = ("name", "data.", "scale.", "tune.")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted config key -> one of {loguniform: [lo, hi]}, {uniform: [lo, hi]} (float keys),
    {randint: [lo, hi]} (int keys, both ends included) or {choice: [v1, v2, ...]} (any key). A spec with
    `when: {model.family: dcgan}` (or a list of allowed values) applies only to trials whose config matches;
    others keep the base value. Non-empty turns the train stage into a search."""
    scheduler: str = "asha"
    """asha (early-stops weak trials at rungs of grace_kimg x reduction_factor^k), pbt (population-based
    training: exploits by checkpoint, explores optim.lr_g / optim.lr_d), or fifo (plain random search)."""
    num_samples: int = 8
    """Trials sampled from the space."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 derives it from the cluster's CPUs (and GPUs)."""
    grace_kimg: float = 1.0
    """ASHA: kimg every trial trains before it can be stopped."""
    reduction_factor: float = 3.0
    """ASHA: a rung keeps the best 1/reduction_factor of the trials that reach it."""
    perturbation_interval_kimg: float = 2.0
    """PBT: kimg between exploit/explore decisions (a multiple of train.fid_every_kimg is sensible)."""
    quantile_fraction: float = 0.25
    """PBT: share of the population that copies the top share's checkpoints."""
    pbt_synchronous: bool = False
    """PBT: decide once every live trial has reached the perturbation point, all trials pausing there (each
    restarts its Ray Train run after the decision), so decisions do not depend on which trial is faster. False
    decides for each trial as it arrives, against the others' latest scores (asynchronous PBT)."""
    metric: str = ""
    """Metric to minimise; empty: train/fid_<train.fid_samples> for images, train/mode_gap for 2-D data."""
    seed: int = 0
    """Seed of the search-space draws: the same seed gives the same trial configs."""
    cpus_per_trial: float = 0.25
    """CPUs a trial's Tune trainable holds besides its Ray Train workers when the trial runs a TorchTrainer
    (scale.num_workers > 1, or a training split over data.cache_mb); fractions allowed, > 0. A single-worker trial
    trains inside its trainable, which then holds one worker's scale.cpus_per_worker (and GPU)."""

    def __post_init__(self) -> None:
        _check(self.scheduler in SCHEDULERS, "tune.scheduler", f"must be one of {', '.join(SCHEDULERS)}",
               self.scheduler)
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1", self.num_samples)
        _check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0",
               self.max_concurrent_trials)
        _check(self.grace_kimg > 0, "tune.grace_kimg", "must be > 0", self.grace_kimg)
        _check(self.reduction_factor > 1, "tune.reduction_factor", "must be > 1", self.reduction_factor)
        _check(self.perturbation_interval_kimg > 0, "tune.perturbation_interval_kimg", "must be > 0",
               self.perturbation_interval_kimg)
        _check(0 < self.quantile_fraction <= 0.5, "tune.quantile_fraction", "must be in (0, 0.5]",
               self.quantile_fraction)
        _check(self.cpus_per_trial > 0, "tune.cpus_per_trial", "must be > 0 (Tune refuses 0; fractions work)",
               self.cpus_per_trial)
        if not isinstance(self.space, dict):
            raise ConfigError(f"tune.space must be a mapping of config keys to specs, got {self.space!r}")
        if self.enabled and self.scheduler == "pbt":
            _check(any(k in self.space for k in PBT_MUTABLE), "tune.scheduler",
                   f"pbt explores {' and '.join(PBT_MUTABLE)}: put at least one of them in tune.space", "pbt")

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def enabled(self) -> bool:
        """A search instead of one training run: the space is not empty."""
        return bool(self.space)


def parse_space(space: dict[str, Any], key_types: dict[str, Any]) -> dict[str, Any]:
    """Validates each search-space entry against the config's dotted keys and their types (`key_types`, from
    `gan.config`, which holds this section) and returns the space with numbers parsed."""
    return {key: _parse_spec(key, spec, key_types) for key, spec in space.items()}


def check_space_values(cfg: Any) -> None:
    """Every choice (and both ends of every range) of `cfg`'s parsed space must give a valid config with the rest
    of `cfg`."""
    base = dataclasses.replace(cfg, tune=SearchConfig())
    for key, spec in cfg.tune.space.items():
        kind = next(k for k in SPEC_KINDS if k in spec)
        for value in spec[kind]:
            cond = {k: allowed[0] for k, allowed in spec.get("when", {}).items() if value_at(cfg, k) not in allowed}
            try:
                with_values(base, {**cond, key: value})
            except ConfigError as err:
                extra = f" with {cond}" if cond else ""
                raise ConfigError(f"tune.space.{key}: {kind} value {value!r}{extra} gives an invalid config: "
                                  f"{err}") from err


def _parse_spec(key: str, spec: Any, types_: dict[str, Any]) -> dict[str, Any]:
    """One search-space entry, checked, with its numbers parsed (YAML reads 1e-4 as a string)."""
    where = f"tune.space.{key}"
    if key not in types_:
        raise ConfigError(f"{where}: {key} is not a config key")
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in UNSEARCHABLE):
        raise ConfigError(f"{where}: {key} cannot be searched (every trial shares the data, the resources "
                          f"and the search settings)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping such as {{choice: [...]}}, got {spec!r}")
    kinds = [k for k in spec if k in SPEC_KINDS]
    unknown = set(spec) - set(SPEC_KINDS) - {"when"}
    if len(kinds) != 1 or unknown:
        raise ConfigError(f"{where} must have exactly one of {', '.join(SPEC_KINDS)} (and optionally when), "
                          f"got {sorted(spec)}")
    kind, tp = kinds[0], types_[key]
    values = spec[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind} must be a non-empty list, got {values!r}")
    if kind == "choice":
        parsed = [coerce(v, tp, f"{where}.choice[{i}]") for i, v in enumerate(values)]
        parsed = [list(v) if isinstance(v, tuple) else v for v in parsed]
    else:
        num = int if kind == "randint" else float
        if tp is not num:
            raise ConfigError(f"{where}.{kind} needs a {num.__name__} key, but {key} is {getattr(tp, '__name__', tp)}")
        if len(values) != 2:
            raise ConfigError(f"{where}.{kind} must be [low, high], got {values!r}")
        parsed = [coerce(v, num, f"{where}.{kind}") for v in values]
        lo, hi = parsed
        _check(lo < hi, f"{where}.{kind}", "must have low < high", values)
        if kind == "loguniform":
            _check(lo > 0, f"{where}.{kind}", "must have low > 0", values)
    out: dict[str, Any] = {kind: parsed}
    if "when" in spec:
        when = spec["when"]
        if not isinstance(when, dict) or not when:
            raise ConfigError(f"{where}.when must map config keys to values, got {when!r}")
        for cond_key in when:
            if cond_key not in types_:
                raise ConfigError(f"{where}.when: {cond_key} is not a config key")
        out["when"] = {k: v if isinstance(v, list) else [v] for k, v in when.items()}
    return out


def applies(spec: dict[str, Any], values: dict[str, Any]) -> bool:
    """Whether a space entry applies to a trial whose flat config values are `values` (its `when` holds)."""
    return all(values[k] in allowed for k, allowed in spec.get("when", {}).items())
