"""gan.parallel's DDP options against the installed torch: accepted, not deprecated, one bucket per CPU model."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan.parallel import CPU_BUCKET_MB, ddp_options


def test_cpu_options_wrap_a_batchnorm_model_without_deprecation_warnings(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # torch 2.14 deprecates broadcast_buffers
            ddp = DistributedDataParallel(model, **ddp_options("cpu"))
        ddp(torch.randn(16, 4)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        assert ddp.bucket_bytes_cap == CPU_BUCKET_MB * 2**20
        assert ddp.gradient_as_bucket_view
    finally:
        dist.destroy_process_group()


def test_cuda_options_keep_ddp_default_buckets():
    assert "bucket_cap_mb" not in ddp_options("cuda")
    assert ddp_options("cuda")["forward_sync_buffers"] is False


def test_a_torch_without_forward_sync_buffers_gets_broadcast_buffers(monkeypatch):
    from gan import parallel

    class OlderDDP:  # DistributedDataParallel's signature before torch had forward_sync_buffers (the GPU machine's)
        def __init__(self, module, broadcast_buffers=True, bucket_cap_mb=None, gradient_as_bucket_view=False):
            pass

    monkeypatch.setattr(parallel, "DistributedDataParallel", OlderDDP)
    parallel._no_buffer_sync_keyword.cache_clear()
    try:
        assert parallel.ddp_options("cuda") == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    finally:
        parallel._no_buffer_sync_keyword.cache_clear()
