"""What training on a device decides, in one place for the Ray workers and torch-only callers alike: the autocast
dtype, the process's threads and cuDNN tuning, and the memory layout of conv models."""

from __future__ import annotations

import torch
from torch import nn

from gan.config import Config


def prepare_process(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Sets this process up for training on `device` and returns the autocast dtype: bf16 on CUDA, none on CPU
    (where torch gets the worker's whole CPUs as threads)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return torch.bfloat16
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    return None


def device_layout(module: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Channels-last convolutions on CUDA (faster with autocast); the module unchanged otherwise."""
    if device.type == "cuda" and cfg.model.family == "dcgan":
        return module.to(memory_format=torch.channels_last)
    return module
