"""What training on a device decides, in one place for the Ray workers and torch-only callers alike: the autocast
dtype (scale.precision), the process's threads and cuDNN tuning, and the memory layout of conv models."""

from __future__ import annotations

import torch
from torch import nn

from gan.config import Config


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The dtype the training steps autocast to under scale.precision, None for fp32."""
    if cfg.scale.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.scale.precision]


def prepare_process(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Sets this process up for training on `device` (cuDNN's autotuner on CUDA; on CPU, the worker's whole CPUs
    as torch threads) and returns the autocast dtype."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    return autocast_dtype(cfg, device)


def device_layout(module: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Channels-last convolutions on CUDA (faster with autocast); the module unchanged otherwise."""
    if device.type == "cuda" and cfg.model.family != "mlp":
        return module.to(memory_format=torch.channels_last)
    return module


def local_device() -> torch.device:
    """The GPU this process sees (a Ray task or worker sees one only when it reserved it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
