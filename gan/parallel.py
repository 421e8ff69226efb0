"""How gan.loop's G and D are wrapped for data parallelism: torch DistributedDataParallel options (no Ray here,
so that the Ray Train adapter and a plain torch.distributed run wrap them the same way)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch.nn.parallel import DistributedDataParallel

CPU_BUCKET_MB = 256
"""DDP gradient bucket on CPU workers: larger than any model that trains sensibly on CPUs, so one all-reduce each."""


def ddp_options(device_type: str) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for G and D on `device_type` ("cpu" or "cuda")."""
    # Buffers are BN statistics, used only at eval time from rank 0's copy: broadcasting them on every forward
    # (DDP's default) costs a collective per D/G call for nothing. (forward_sync_buffers replaces the deprecated
    # broadcast_buffers; it still syncs them once at init, which is harmless: every rank builds the same models.)
    options: dict[str, Any] = {_no_buffer_sync_keyword(): False, "gradient_as_bucket_view": True}
    if device_type == "cpu":
        # gloo on CPUs is bound by the number of all-reduces, and busy cores leave no room to overlap them with
        # the backward. One bucket per model (not DDP's 1 MiB first + 25 MiB ones) took 2 workers over 1 from
        # 1.57x to 1.83x for bench/throughput.py's DCGAN under plain torch.distributed (no Ray).
        options["bucket_cap_mb"] = CPU_BUCKET_MB
    return options


@functools.cache
def _no_buffer_sync_keyword() -> str:
    """forward_sync_buffers where this torch has it; broadcast_buffers (its older name, deprecated since) before."""
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
