"""Full training state <-> a folder of plain state_dict files, loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gan import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint's state file is truncated or unreadable; the message names the object."""


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP (or similar) wrapper, so state_dict keys carry no 'module.' prefix."""
    return module.module if hasattr(module, "module") else module


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, *, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], counters: dict[str, int],
                    extra: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Writes state.pt (tensors, numbers, strings only) and a human-readable meta.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "modules": {name: unwrap(m).state_dict() for name, m in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "counters": dict(counters),
        "rng": rng_state(),
        "extra": extra or {},
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps({**(meta or {}), **counters}, indent=2, sort_keys=True))
    return directory


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw state dict of a checkpoint folder (a local folder or a storage URI); never unpickles classes."""
    path = storage.join(directory, STATE_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"no checkpoint state at {path}")
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"checkpoint state {path} is truncated or unreadable: {err}") from err


def load_checkpoint(directory: str | Path, *, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool = True,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Restores modules, optimizers and RNG in place; returns the state (counters, extra) for the caller."""
    state = read_checkpoint(directory, map_location)
    for name, module in modules.items():
        unwrap(module).load_state_dict(state["modules"][name])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def override_optimizer_settings(directory: str | Path, settings: dict[str, dict[str, Any]]) -> None:
    """Rewrites the param groups' settings (e.g. {"opt_g": {"lr": 1e-4, "betas": (0.5, 0.999)}}) in a local
    checkpoint folder's state file; the optimizers' moments are kept."""
    path = Path(directory) / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, values in settings.items():
        for group in state["optimizers"][name]["param_groups"]:
            group.update(values)
    torch.save(state, path)
