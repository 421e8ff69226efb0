"""Config values, for any nested frozen dataclass: the error every check raises, the check itself, reading a loaded
value as its field's type, and copies with dotted keys set (shared by gan.config, gan.tune_space and
gan.config_loader)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def check(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}, got {value!r}")


def field_type(cls: type, name: str) -> Any:
    """The annotation of field `name` of dataclass `cls`, resolved."""
    return typing.get_type_hints(cls)[name]


def leaf_types(cls: type) -> dict[str, Any]:
    """Dotted key -> annotation, for every leaf of the nested dataclass `cls`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in leaf_types(tp).items()})
        else:
            out[f.name] = tp
    return out


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats, lists for tuples; floats must be
    finite."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if isinstance(value, str):
            # flatten() writes a mapping as one JSON string (an MLflow param); read it back.
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"{key} must be a mapping, got {value!r}") from err
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return json.loads(json.dumps(value))
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if value is None and arg is type(None):
                return None
        return coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)), key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string: accept what float() accepts.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {tp.__name__}, got {value!r}")
    return value


def value_at(cfg: Any, dotted: str) -> Any:
    """The value of a dotted key in plain form (tuples as lists, as in a flattened config)."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def with_values(cfg: Any, values: dict[str, Any]) -> Any:
    """A copy of the (nested, frozen) `cfg` with dotted keys set, each value read as its field's type and every
    section on the way checked again."""
    for dotted, value in values.items():
        cfg = _replaced(cfg, dotted.split("."), value, dotted)
    return cfg


def _replaced(section: Any, path: list[str], value: Any, dotted: str) -> Any:
    name, rest = path[0], path[1:]
    tp = field_type(type(section), name)
    new = _replaced(getattr(section, name), rest, value, dotted) if rest else coerce(value, tp, dotted)
    return dataclasses.replace(section, **{name: new})
