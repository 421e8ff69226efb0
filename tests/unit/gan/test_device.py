"""scale.precision on the CPU (torch's CPU autocast): the autocast path every GPU worker takes, with every loss and
penalty, fp16's gradient scaler through a checkpoint, and fp32 where low precision would be wrong."""

import shutil

import pytest
import torch

from gan.checkpoint import read_checkpoint
from gan.config import ConfigError
from gan.config_loader import load_config
from gan.device import autocast_dtype
from gan.export import served_generator
from gan.loop import DataSpec, build_state, fit, restore_state

IMAGE_SPEC = DataSpec(shape=(1, 28, 28), num_classes=10)
TINY_DCGAN = ["data.source=digits", "model.family=dcgan", "model.g_width=8", "model.d_width=8", "model.z_dim=16",
              "train.batch_size=16", "train.log_every_kimg=0.032", "train.checkpoint_every_kimg=0.032"]


def image_batches(e: int):
    g = torch.Generator().manual_seed(e)
    for _ in range(4):
        yield torch.rand(16, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (16,), generator=g)


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(load_config(), cpu) is None and autocast_dtype(load_config(), cuda) is torch.bfloat16
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert autocast_dtype(load_config(None, [f"scale.precision={name}"]), cpu) is dtype
    with pytest.raises(ConfigError, match="scale.precision must be one of auto, fp32, bf16, fp16"):
        load_config(None, ["scale.precision=fp8"])


@pytest.mark.parametrize("loss", [["loss.kind=bce"], ["loss.kind=hinge", "loss.r1_gamma=1"],
                                  ["loss.kind=wgan-gp", "loss.n_critic=2", "optim.beta1=0"], ["loss.kind=lsgan"],
                                  ["loss.kind=rpgan", "loss.r1_gamma=1", "loss.r2_gamma=1",
                                   "model.diffaugment=color,translation,cutout"]])
def test_bf16_autocast_runs_the_networks_low_and_the_losses_and_penalties_in_fp32(loss):
    cfg = load_config(None, [*TINY_DCGAN, "train.kimg=0.064", *loss])
    seen: list[torch.dtype] = []
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append(metrics)

    class Recording(torch.nn.Module):  # wraps D to record the dtype of every forward's output
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, y=None):
            out = self.net(x, y)
            seen.append(out.dtype)
            return out

    wrapped = iter([lambda m: m, Recording])  # fit wraps G first, then D
    state = fit(cfg, image_batches, spec=IMAGE_SPEC, report=report, autocast_dtype=torch.bfloat16,
                wrap=lambda m: next(wrapped)(m))
    assert torch.bfloat16 in seen, "D never ran under autocast"
    penalised = cfg.loss.kind == "wgan-gp" or cfg.loss.r1_gamma > 0 or cfg.loss.r2_gamma > 0
    assert (torch.float32 in seen) == penalised, "the penalties' D forwards run in fp32, and only they"
    assert all(torch.isfinite(torch.tensor(r["loss/d"])) and torch.isfinite(torch.tensor(r["loss/g"]))
               for r in reports)
    assert all(p.dtype == torch.float32 for p in state.G_ema.parameters()), "G_ema averages fp32 weights"
    served = served_generator(state.G_ema, z_dim=16, points=False, scale=1.0, conditional=False, num_classes=10)
    assert served(torch.randn(3, 16)).dtype == torch.float32


def test_fp16_keeps_its_gradient_scalers_through_a_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY_DCGAN, "train.kimg=0.064", "scale.precision=fp16"])
    saved = []

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            target = tmp_path / f"ckpt-{len(saved)}"
            shutil.copytree(checkpoint_dir, target)
            saved.append(target)

    fit(cfg, image_batches, spec=IMAGE_SPEC, report=keep, autocast_dtype=torch.float16)
    scalers = read_checkpoint(saved[-1])["extra"]["grad_scalers"]
    assert set(scalers) == {"g", "d"} and all(s["scale"] > 0 for s in scalers.values())

    state = build_state(cfg, IMAGE_SPEC)
    state.scalers = {k: torch.amp.GradScaler("cpu", init_scale=1.0) for k in ("g", "d")}
    restore_state(state, saved[-1])
    assert {k: s.get_scale() for k, s in state.scalers.items()} == {k: s["scale"] for k, s in scalers.items()}

    longer = load_config(None, [*TINY_DCGAN, "train.kimg=0.096", "scale.precision=fp16"])
    resumed = fit(longer, image_batches, spec=IMAGE_SPEC, report=lambda m, c: None, resume=saved[-1],
                  autocast_dtype=torch.float16)
    assert resumed.images == 96
    assert resumed.scalers["d"].get_scale() > 0
