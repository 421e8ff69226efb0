"""The error every config check raises, and the check itself (shared by gan.config and gan.tune_space)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def check(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}, got {value!r}")
