"""The CUDA path of the core, which every GPU worker runs: autocast with every loss and penalty, fp16's scaler,
channels-last convolutions, evaluation on the GPU agreeing with the CPU. Marked `gpu`; they skip without CUDA. They
also run without pytest (the GPU machine has none): bench/gpu_check.py imports this module and calls them."""

from __future__ import annotations

import torch

try:
    import pytest

    gpu = pytest.mark.gpu
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
except ImportError:  # bench/gpu_check.py on a machine without pytest
    def gpu(f):
        return f

    needs_cuda = gpu

from gan.config_loader import load_config
from gan.device import autocast_dtype, device_layout, prepare_process
from gan.loop import DataSpec, fit
from gan.metrics.evaluator import Evaluator
from gan.metrics.image_metrics import evaluate_images, latent_sampler
from gan.models import build_models

SPEC = DataSpec(shape=(3, 32, 32), num_classes=10)
DCGAN32 = ["data.source=cifar10", "data.resolution=32", "model.family=dcgan", "model.g_width=16", "model.d_width=16",
           "model.z_dim=32", "train.batch_size=64", "train.kimg=0.256", "train.log_every_kimg=0.128",
           "train.checkpoint_every_kimg=0.256"]


def _batches(device):
    def epoch(e):
        g = torch.Generator().manual_seed(e)
        for _ in range(4):
            yield (torch.rand(64, 3, 32, 32, generator=g) * 2 - 1).to(device), torch.randint(0, 10, (64,), generator=g)
    return epoch


def _fit_on_cuda(*overrides):
    cfg = load_config(None, [*DCGAN32, *overrides])
    device = torch.device("cuda")
    reports = []
    state = fit(cfg, _batches(device), spec=SPEC, report=lambda m, c: reports.append(m), device=device,
                autocast_dtype=prepare_process(cfg, device), wrap=lambda m: device_layout(m, cfg, device))
    return state, reports


@gpu
@needs_cuda
def test_auto_precision_is_bf16_on_cuda_with_every_loss_and_penalty():
    assert autocast_dtype(load_config(), torch.device("cuda")) is torch.bfloat16
    for loss in (["loss.kind=bce"], ["loss.kind=hinge", "loss.r1_gamma=1"], ["loss.kind=wgan-gp", "optim.beta1=0"],
                 ["loss.kind=lsgan"]):
        state, reports = _fit_on_cuda(*loss)
        assert state.images == 256 and all(torch.isfinite(torch.tensor(r["loss/d"])) for r in reports), loss
        assert next(state.G.parameters()).is_cuda


@gpu
@needs_cuda
def test_fp16_trains_with_its_scalers_on_cuda():
    state, reports = _fit_on_cuda("scale.precision=fp16")
    assert set(state.scalers) == {"g", "d"} and state.scalers["d"].get_scale() > 0
    assert all(torch.isfinite(torch.tensor(r["loss/g"])) for r in reports)


@gpu
@needs_cuda
def test_conv_models_train_channels_last_on_cuda():
    cfg = load_config(None, DCGAN32)
    G, _ = build_models(cfg.model, loss_kind="bce", data_shape=SPEC.shape, num_classes=0)
    G = device_layout(G.cuda(), cfg, torch.device("cuda"))
    conv = next(m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@gpu
@needs_cuda
def test_evaluation_on_the_gpu_agrees_with_the_cpu():
    torch.manual_seed(0)
    net = Evaluator(in_channels=3, resolution=32, num_classes=10).eval()
    cfg = load_config(None, DCGAN32)
    G, _ = build_models(cfg.model, loss_kind="bce", data_shape=SPEC.shape, num_classes=0)
    real = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scores = {}
    for device in ("cpu", "cuda"):
        scores[device] = evaluate_images(latent_sampler(G.to(device).eval(), 32), real, net.to(device),
                                         num_samples=2000, seed=3)
    for key, value in scores["cpu"].items():
        # 1%: cuDNN convolutions run in TF32 by default on Ampere and later, so features differ in the 4th digit.
        assert abs(scores["cuda"][key] - value) <= 1e-2 * max(1.0, abs(value)), (key, value, scores["cuda"][key])
