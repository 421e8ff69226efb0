"""Throughput benchmark: a plain PyTorch GAN loop vs gan.loop.fit in-process vs Ray Train with 1 and 2 workers
(alternating, `--rounds` times), and 2 torch DDP processes without Ray to tell DDP's cost from Ray's.

Same DCGAN-28 (1 channel, widths 32) and per-worker batch 64 everywhere, one torch thread per process.
Steady-state images/s is the median over report intervals that start after the warm-up; start-up is the wall
time to the first report minus the images shown by then at the steady rate. Run from the project root:

    .venv/bin/python -m bench.throughput [--kimg 24] [--warmup-kimg 4] [--log-every-kimg 4] [--rounds 2]

Misses are printed, never raised: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gan.config import Config
from gan.config_loader import from_dict, load_config, to_dict
from gan.data import load_manifest, prepare, read_split, to_model_range
from gan.loop import DataSpec, fit
from gan.models import build_models
from gan.parallel import ddp_options

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
RAY_CPUS, READ_TASK_CPUS = 2, 1.0
TARGETS = {"ray1/plain": 0.95, "ray2/ray1": 1.6}
Point = tuple[int, float, float]
"""(images at the end of a report interval, wall time of the report, interval img/s)."""


@dataclass(frozen=True)
class Result:
    name: str
    batch: int
    img_per_s: float
    wall_img_per_s: float
    startup_s: float
    total_s: float


def summarise(name: str, batch: int, t0: float, t_end: float, points: list[Point], warmup_kimg: float) -> Result:
    """Median interval rate after the warm-up, a wall-clock rate (reports included), start-up and total time."""
    # Interval i runs from points[i - 1] to points[i]; steady ones start at or after the warm-up.
    first = next((i for i in range(1, len(points)) if points[i - 1][0] >= warmup_kimg * 1000), len(points) - 1)
    first = max(first, 1) if len(points) > 1 else 0
    steady = points[first:]
    rate = statistics.median(p[2] for p in steady)
    start = points[first - 1] if first > 0 else (0, t0, 0.0)
    wall_rate = (points[-1][0] - start[0]) / max(points[-1][1] - start[1], 1e-9)
    startup = max(0.0, points[0][1] - t0 - points[0][0] / rate)
    return Result(name, batch, rate, wall_rate, startup, t_end - t0)


def in_memory_batches(dataset_dir: Path, batch: int, seed: int) -> Callable[[int], Iterator[tuple[torch.Tensor, None]]]:
    """epoch -> shuffled full batches of the train split, held in memory in the model range."""
    manifest = load_manifest(dataset_dir)
    x, _ = read_split(manifest, "train")
    real_all = to_model_range(x, manifest.scale)

    def epoch(e: int) -> Iterator[tuple[torch.Tensor, None]]:
        order = torch.randperm(len(real_all), generator=torch.Generator().manual_seed(seed * 1000 + e))
        for i in range(0, len(order) - batch + 1, batch):
            yield real_all[order[i:i + batch]], None
    return epoch


def run_plain(cfg: Config, dataset_dir: Path, warmup_kimg: float) -> Result:
    """The textbook loop (PyTorch DCGAN tutorial): D on real + detached fake, then G through D, same fake."""
    t0 = time.time()
    batches = in_memory_batches(dataset_dir, cfg.train.batch_size, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    G, D = build_models(cfg.model, loss_kind="bce", data_shape=tuple(load_manifest(dataset_dir).shape),
                        num_classes=0)
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    every, target = round(cfg.train.log_every_kimg * 1000), round(cfg.train.kimg * 1000)
    images, next_log, points, epoch = 0, every, [], 0
    t_last, images_last = time.time(), 0
    while images < target:
        for real, _ in batches(epoch):
            z = torch.randn(real.shape[0], G.z_dim)
            fake = G(z)
            ones, zeros = torch.ones(real.shape[0]), torch.zeros(real.shape[0])
            opt_d.zero_grad()
            loss_d = (F.binary_cross_entropy_with_logits(D(real).view(-1), ones)
                      + F.binary_cross_entropy_with_logits(D(fake.detach()).view(-1), zeros))
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = F.binary_cross_entropy_with_logits(D(fake).view(-1), ones)
            loss_g.backward()
            opt_g.step()
            images += real.shape[0]
            if images >= next_log or images >= target:
                now = time.time()
                points.append((images, now, (images - images_last) / (now - t_last)))
                t_last, images_last = now, images
                next_log = (images // every + 1) * every
            if images >= target:
                break
        epoch += 1
    return summarise("plain", cfg.train.batch_size, t0, time.time(), points, warmup_kimg)


def run_ours(cfg: Config, dataset_dir: Path, warmup_kimg: float) -> Result:
    """gan.loop.fit in this process, fed the same in-memory batches; report just records the metrics."""
    t0 = time.time()
    points: list[Point] = []

    def report(metrics: dict[str, float], _checkpoint_dir: str | None) -> None:
        points.append((round(metrics["progress/kimg"] * 1000), time.time(), metrics["perf/img_per_s"]))

    batches = in_memory_batches(dataset_dir, cfg.train.batch_size, cfg.train.seed)
    fit(cfg, batches, spec=DataSpec.from_manifest(load_manifest(dataset_dir)), report=report)
    return summarise("ours in-process", cfg.train.batch_size, t0, time.time(), points, warmup_kimg)


def _ddp_process(rank: int, world: int, port: int, config: dict, dataset_dir: str, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = from_dict(config)
        points: list[Point] = []

        def report(metrics: dict[str, float], _checkpoint_dir: str | None) -> None:
            points.append((round(metrics["progress/kimg"] * 1000), time.time(), metrics["perf/img_per_s"]))

        batches = in_memory_batches(Path(dataset_dir), cfg.train.batch_size // world, cfg.train.seed * 10 + rank)
        fit(cfg, batches, spec=DataSpec.from_manifest(load_manifest(dataset_dir)), report=report,
            wrap=lambda m: DistributedDataParallel(m, **ddp_options("cpu")), rank=rank, world_size=world)
        if rank == 0:
            out.put(points)
    finally:
        dist.destroy_process_group()


def run_ddp(cfg: Config, dataset_dir: Path, warmup_kimg: float, world: int = 2) -> Result:
    """gan.loop.fit in `world` processes under plain torch.distributed (gloo, in-memory batches, no Ray), wrapped
    as Ray Train wraps them: what DDP itself costs, apart from what Ray adds."""
    t0 = time.time()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_process, args=(r, world, port, to_dict(cfg), str(dataset_dir), out))
             for r in range(world)]
    for proc in procs:
        proc.start()
    points = None
    while points is None:
        try:
            points = out.get(timeout=5)
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"a torch DDP process exited with code {failed[0]}") from None
    for proc in procs:
        proc.join()
    return summarise(f"torch DDP {world} procs", cfg.train.batch_size, t0, time.time(), points, warmup_kimg)


def run_ray(cfg: Config, dataset_dir: Path, warmup_kimg: float, workdir: Path) -> Result:
    """pipelines.ray_train.train; rank 0 logs every interval's metrics to a throwaway MLflow store."""
    from pipelines.ray_train import train
    from pipelines.ray_train_worker import Tracking
    from pipelines.tracking import Tracker

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.start_run("bench-throughput", cfg.name)
    t0 = time.time()
    train(cfg, dataset_dir, storage_path=workdir / "ray", tracking=Tracking(uri, run_id), max_failures=0)
    t_end = time.time()
    history = sorted(tracker.metric_history(run_id, "perf/img_per_s"), key=lambda m: m.step)
    points = [(m.step, m.timestamp / 1000, m.value) for m in history]
    name = f"ray {cfg.scale.num_workers} worker" + ("s" if cfg.scale.num_workers > 1 else "")
    return summarise(name, cfg.train.batch_size, t0, t_end, points, warmup_kimg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kimg", type=float, default=48.0, help="images per variant, in thousands")
    parser.add_argument("--warmup-kimg", type=float, default=12.0, help="report intervals starting earlier are ignored")
    # Ray Train V2 polls each worker's 1-slot result queue every 2 s: shorter intervals block in report.
    parser.add_argument("--log-every-kimg", type=float, default=12.0, help="report interval, in kimg")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="Ray CPUs per Train worker")
    parser.add_argument("--rounds", type=int, default=2, help="alternating Ray 1-worker / 2-worker runs")
    parser.add_argument("--data-dir", default="data", help="where the prepared dataset is cached")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least one round of Ray 1- and 2-worker runs is needed")
    if 2 * args.cpus_per_worker > RAY_CPUS - READ_TASK_CPUS:
        # Ray Data's Parquet read tasks ask for 1 whole CPU: with less left over, two workers hang forever.
        parser.error(f"--cpus-per-worker {args.cpus_per_worker:g}: two workers must leave {READ_TASK_CPUS:g} of "
                     f"the {RAY_CPUS:g} Ray CPUs to Ray Data's read tasks")
    torch.set_num_threads(1)

    data = ["data.source=idx", f"data.root={MNIST_ROOT}"]
    if not MNIST_ROOT.is_dir():
        print(f"note: {MNIST_ROOT} is absent; using sklearn digits resized to 28x28 instead of MNIST")
        data = ["data.source=digits"]
    base = [*data, "data.resolution=28", "model.family=dcgan", "model.g_width=32", "model.d_width=32",
            "loss.kind=bce", "optim.ema=false", "train.batch_size=64", f"train.kimg={args.kimg}",
            f"train.log_every_kimg={args.log_every_kimg}", f"train.checkpoint_every_kimg={args.kimg}",
            f"scale.cpus_per_worker={args.cpus_per_worker}"]
    cfg = load_config(None, [*base, "name=bench-inproc"])
    dataset_dir = prepare(cfg.data, out_dir=args.data_dir)
    print(f"data {dataset_dir.name}: {load_manifest(dataset_dir).count('train')} train images; "
          f"{args.kimg:g} kimg per variant, warm-up {args.warmup_kimg:g} kimg, report every "
          f"{args.log_every_kimg:g} kimg; 1 torch thread per process", flush=True)

    cfg_ddp = load_config(None, [*base, "name=bench-ddp2", "train.batch_size=128"])
    results = []
    for run, run_cfg in ((run_plain, cfg), (run_ours, cfg), (run_ddp, cfg_ddp)):
        results.append(run(run_cfg, dataset_dir, args.warmup_kimg))
        print(f"  {results[-1].name}: {results[-1].img_per_s:.0f} img/s", flush=True)
    plain, ours, ddp2 = results

    import ray

    t_ray = time.time()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_init_s = time.time() - t_ray
    rounds: list[tuple[Result, Result]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
            # 1 and 2 workers alternate, so that each round's ratio is taken minutes apart at most: a shared VM's
            # speed drifts by 20% over a run. Same per-worker batch (64): global batch 64 for one, 128 for two.
            for k in range(args.rounds):
                pair = []
                for workers in (1, 2):
                    cfg_ray = load_config(None, [*base, f"name=bench-ray{workers}-{k}", f"scale.num_workers={workers}",
                                                 f"train.batch_size={64 * workers}"])
                    pair.append(run_ray(cfg_ray, dataset_dir, args.warmup_kimg, Path(tmp)))
                    print(f"  {pair[-1].name} (round {k + 1}): {pair[-1].img_per_s:.0f} img/s", flush=True)
                rounds.append((pair[0], pair[1]))
                results.extend(pair)
    finally:
        ray.shutdown()

    print(f"\n{'variant':<20}{'batch':>6}{'img/s':>9}{'img/s wall':>12}{'startup s':>11}{'total s':>9}")
    for r in results:
        print(f"{r.name:<20}{r.batch:>6}{r.img_per_s:>9.0f}{r.wall_img_per_s:>12.0f}{r.startup_s:>11.1f}"
              f"{r.total_s:>9.1f}")
    print(f"(ray.init took {ray_init_s:.1f} s, not counted above; 'img/s' is the median interval rate, reports "
          f"included; 'img/s wall' also counts epoch boundaries; batch is global, 64 per process)\n")

    def ratio(key: str, values: list[float], walls: list[float]) -> None:
        value, target = statistics.median(values), TARGETS.get(key)
        spread = f" rounds {', '.join(f'{v:.2f}' for v in values)}" if len(values) > 1 else ""
        verdict = f"   target >= {target:g}: {'PASS' if value >= target else 'MISS'}" if target else ""
        print(f"{key:<11}{value:>6.2f}  (wall {statistics.median(walls):.2f}){spread}{verdict}")

    ray1 = [r1 for r1, _ in rounds]
    ratio("ours/plain", [ours.img_per_s / plain.img_per_s], [ours.wall_img_per_s / plain.wall_img_per_s])
    ratio("ray1/plain", [r.img_per_s / plain.img_per_s for r in ray1],
          [r.wall_img_per_s / plain.wall_img_per_s for r in ray1])
    ratio("ray2/ray1", [r2.img_per_s / r1.img_per_s for r1, r2 in rounds],
          [r2.wall_img_per_s / r1.wall_img_per_s for r1, r2 in rounds])
    ratio("ddp2/ours", [ddp2.img_per_s / ours.img_per_s], [ddp2.wall_img_per_s / ours.wall_img_per_s])
    ratio("ray2/ddp2", [r2.img_per_s / ddp2.img_per_s for _, r2 in rounds],
          [r2.wall_img_per_s / ddp2.wall_img_per_s for _, r2 in rounds])

if __name__ == "__main__":
    main()
