"""Reading a Config from plain values, YAML files and `key=value` overrides, and writing it back as plain values,
flat dotted keys (MLflow params, Tune spaces, --set) and a short hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from gan.config import Config
from gan.config_checks import ConfigError, coerce, field_type


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = field_type(cls, name)
        kwargs[name] = _build(tp, value, key) if dataclasses.is_dataclass(tp) else coerce(value, tp, key)
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Builds a Config from nested plain values; unknown keys and bad values raise ConfigError."""
    return _build(Config, values, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain values (tuples as lists): the form that crosses the Ray boundary and YAML."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted keys (`optim.lr_g`) to values: MLflow params, Tune search spaces and --set share these names."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix == "tune.space":
            out[prefix] = json.dumps(value, sort_keys=True)  # one param: its keys are dotted themselves
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value
    walk("", to_dict(cfg))
    return out


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns a deep copy of nested `values` with dotted keys set; unknown keys are caught when built."""
    merged = json.loads(json.dumps(values))
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
            node = child
        node[leaf] = value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """Parses `key=value` from the command line; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """YAML file (optional) plus `key=value` overrides -> validated Config."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        values = loaded or {}
    if overrides:
        pairs = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
        values = apply_overrides(values, dict(pairs))
    return from_dict(values)


def config_hash(section: Any) -> str:
    """Short stable hash of a config (or one section), for lineage and cache keys."""
    plain = to_dict(section) if isinstance(section, Config) else dataclasses.asdict(section)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
