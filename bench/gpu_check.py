"""One short check of a GPU machine with the core alone (torch, torchvision, torchmetrics; nothing of pipelines/):
the tests marked `gpu`, images/s of a plain PyTorch loop against gan.loop.fit for DCGAN-64 and DCGAN-32 in fp32,
bf16 and bf16 + channels_last, the time to score 10k samples on the GPU and on the CPU, and, with time left, plain
torch DDP over gloo on 1, 2, 4 and 8 CPU processes. Prints one table; misses are printed, never raised.

    python -m bench.gpu_check                       # on the GPU machine, within 4 minutes
    python -m bench.gpu_check --device cpu --quick  # the same steps in miniature, under a minute on 2 CPUs
"""

from __future__ import annotations

import argparse
import importlib
import socket
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gan.config import Config
from gan.config_loader import load_config
from gan.device import device_layout, prepare_process
from gan.loop import DataSpec, fit
from gan.metrics.evaluator import Evaluator
from gan.metrics.image_metrics import evaluate_images, latent_sampler
from gan.models import build_models
from gan.parallel import ddp_options

BUDGET_S = 240.0
Row = tuple[str, str, str, str]
"""(check, measured, target, PASS / MISS / n/a / FAIL)."""


def dcgan(resolution: int, width: int, batch: int, kimg: float, precision: str) -> Config:
    return load_config(None, ["data.source=cifar10", f"data.resolution={resolution}", "model.family=dcgan",
                              f"model.g_width={width}", f"model.d_width={width}", "optim.ema=false",
                              f"train.batch_size={batch}", f"train.kimg={kimg}", f"train.log_every_kimg={kimg / 4}",
                              f"train.checkpoint_every_kimg={kimg}", f"scale.precision={precision}"])


def gpu_tests() -> list[Row]:
    """Every `test_*` of tests/unit/gan/test_gpu.py, called directly (the GPU machine has no pytest)."""
    module = importlib.import_module("tests.unit.gan.test_gpu")
    rows = []
    for name in sorted(n for n in dir(module) if n.startswith("test_")):
        if not torch.cuda.is_available():
            rows.append((f"gpu test {name}", "skipped: no CUDA", "passes", "n/a"))
            continue
        start = time.perf_counter()
        try:
            getattr(module, name)()
            rows.append((f"gpu test {name}", f"{time.perf_counter() - start:.1f} s", "passes", "PASS"))
        except Exception as err:  # a failing check is a row of the table, and the rest still runs
            traceback.print_exc()
            rows.append((f"gpu test {name}", f"{type(err).__name__}: {err}"[:80], "passes", "FAIL"))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fake_data(cfg: Config, device: torch.device) -> Callable[[int], object]:
    """One random batch on the device, every step: the loop's speed without a data pipeline."""
    real = torch.rand(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1

    def epoch(e: int):
        for _ in range(1_000_000):
            yield real, None
    return epoch


def plain_img_per_s(cfg: Config, device: torch.device, autocast: torch.dtype | None, layout: bool, steps: int,
                    warmup: int) -> float:
    """The textbook loop (one D and one G step of the non-saturating loss, Adam), timed after `warmup` steps."""
    prepare_process(cfg, device)
    G, D = build_models(cfg.model, loss_kind="bce", data_shape=(3, cfg.data.resolution, cfg.data.resolution),
                        num_classes=0)
    G, D = G.to(device), D.to(device)
    if layout:
        G, D = device_layout(G, cfg, device), device_layout(D, cfg, device)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = next(iter(_fake_data(cfg, device)(0)))[0]
    b = real.shape[0]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            fake = G(torch.randn(b, G.z_dim, device=device))
            loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss_g = F.softplus(-D(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    _sync(device)
    return steps * b / (time.perf_counter() - start)


def fit_img_per_s(cfg: Config, device: torch.device, layout: bool) -> float:
    """gan.loop.fit's own measure of its last report interval (perf/img_per_s), after three earlier ones."""
    reports: list[dict[str, float]] = []
    autocast = prepare_process(cfg, device)
    fit(cfg, _fake_data(cfg, device), spec=DataSpec(shape=(3, cfg.data.resolution, cfg.data.resolution)),
        report=lambda m, c: reports.append(m), device=device, autocast_dtype=autocast,
        wrap=(lambda m: device_layout(m, cfg, device)) if layout else None)
    return reports[-1]["perf/img_per_s"]


def speed_rows(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    sizes = [(32, 8, 32)] if quick else [(64, 64, 256), (32, 64, 256)]
    for resolution, width, batch in sizes:
        steps = 4 if quick else 40
        kimg = (steps * 4 * batch) / 1000  # four report intervals of `steps` steps
        speeds = {}
        variants = [("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16 + channels_last", "bf16", True)]
        for label, precision, layout in variants:
            cfg = dcgan(resolution, width, batch, kimg, precision)
            autocast = None if precision == "fp32" else torch.bfloat16
            plain = plain_img_per_s(cfg, device, autocast, layout, steps, warmup=2 if quick else 10)
            ours = fit_img_per_s(cfg, device, layout)
            speeds[label] = ours
            name = f"DCGAN-{resolution} batch {batch} {label}"
            rows.append((f"{name}: plain loop", f"{plain:,.0f} img/s", "", ""))
            rows.append((f"{name}: gan.loop.fit / plain", f"{ours:,.0f} img/s ({ours / plain:.2f}x)", ">= 0.95x",
                         "PASS" if ours / plain >= 0.95 else "MISS"))
        if "bf16" in speeds:
            ratio = speeds["bf16"] / speeds["fp32"]
            judged = resolution == 64 and device.type == "cuda"
            target, verdict = (">= 1.5x", "PASS" if ratio >= 1.5 else "MISS") if judged else ("", "")
            rows.append((f"DCGAN-{resolution}: fit bf16 / fp32", f"{ratio:.2f}x", target, verdict))
    return rows


def eval_rows(device: torch.device, quick: bool) -> list[Row]:
    """Seconds to score n samples (FID, IS, KID, precision/recall in the evaluator's space) on each device."""
    n = 500 if quick else 10_000
    real = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = load_config(None, ["data.source=digits", "model.family=dcgan", "model.g_width=32", "model.d_width=32"])
    G, _ = build_models(cfg.model, loss_kind="bce", data_shape=(1, 28, 28), num_classes=0)
    rows = []
    for where in dict.fromkeys([device.type, "cpu"]):
        net = Evaluator(in_channels=1, resolution=28, num_classes=10).eval().to(where)
        _sync(torch.device(where))
        start = time.perf_counter()
        evaluate_images(latent_sampler(G.to(where).eval(), cfg.model.z_dim), real, net, num_samples=n, seed=1)
        _sync(torch.device(where))
        seconds = time.perf_counter() - start
        gpu = where == "cuda" and not quick
        rows.append((f"evaluate {n:,} samples on {where}", f"{seconds:.1f} s", "< 5 s" if gpu else "",
                     ("PASS" if seconds < 5 else "MISS") if gpu else ""))
    return rows


def _ddp_worker(rank: int, world: int, port: int, steps: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = dcgan(32, 16, 32 * world, 1.0, "fp32")
        G, D = build_models(cfg.model, loss_kind="bce", data_shape=(3, 32, 32), num_classes=0)
        G, D = DistributedDataParallel(G, **ddp_options("cpu")), DistributedDataParallel(D, **ddp_options("cpu"))
        opt = torch.optim.Adam(list(G.parameters()) + list(D.parameters()), lr=2e-4)
        real = torch.rand(32, 3, 32, 32) * 2 - 1
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            fake = G(torch.randn(32, cfg.model.z_dim))
            loss = F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            out.put(steps * 32 * world / (time.perf_counter() - start))
    finally:
        dist.destroy_process_group()


def ddp_rows(worlds: list[int], steps: int, deadline: float) -> list[Row]:
    """Plain torch DDP on gloo, one thread per process: images/s with 1, 2, 4, 8 processes, while time is left."""
    rows, base = [], None
    ctx = mp.get_context("spawn")
    for world in worlds:
        if time.perf_counter() > deadline:
            rows.append((f"DDP gloo {world} CPU processes", "skipped: out of time", "", "n/a"))
            continue
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        out = ctx.Queue()
        procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, steps, out)) for r in range(world)]
        for p in procs:
            p.start()
        speed = out.get(timeout=120)
        for p in procs:
            p.join()
        base = base or speed
        rows.append((f"DDP gloo {world} CPU processes", f"{speed:,.0f} img/s ({speed / base:.2f}x of 1)", "", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the same steps in miniature (under a minute on 2 CPUs)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    rows: list[Row] = []
    for part in (gpu_tests, lambda: speed_rows(device, args.quick), lambda: eval_rows(device, args.quick)):
        rows += part()
        print(f"... {time.perf_counter() - start:.0f} s", flush=True)
    worlds = [1, 2] if args.quick else [1, 2, 4, 8]
    rows += ddp_rows(worlds, steps=3 if args.quick else 20, deadline=start + BUDGET_S - 40)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'check':<{width}} | measured | target | result |\n| {'-' * width} | ---: | --- | --- |")
    for check, measured, target, verdict in rows:
        print(f"| {check:<{width}} | {measured} | {target} | {verdict} |")
    print(f"\n{time.perf_counter() - start:.0f} s in all (budget {BUDGET_S:.0f} s)")
    return 0 if not any(r[3] == "FAIL" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
