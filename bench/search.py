"""Search benchmark: ASHA vs random search (FIFO), same trials, seed, budget and data: total kimg, best FID and where
each search's time went (summed over its trials: start-up, training, checkpointing, scoring, reporting, teardown, and
slot-seconds no trial held); then the start-up of 2-worker trials beside it."""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers stall torch badly when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from gan.config_loader import load_config
from pipelines import ray_train_worker, ray_tune
from pipelines.stages import Context, evaluator_stage, prepare_stage
from pipelines.tracking import Tracker
from pipelines.tune_trial import PHASES

SPACE = ("{optim.lr_g: {loguniform: [1e-4, 3e-3]}, optim.lr_d: {loguniform: [1e-4, 3e-3]},"
         " optim.beta1: {uniform: [0.0, 0.9]}, model.hidden: {choice: [[64], [128], [128, 128]]}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--kimg", type=float, default=32.0, help="maximum budget per trial")
    parser.add_argument("--grace-kimg", type=float, default=2.0, help="ASHA's first rung; also the scoring interval")
    parser.add_argument("--reduction-factor", type=float, default=4.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--two-worker-trials", type=int, default=2,
                        help="also run this many 2-worker trials (FIFO, grace-kimg each) for their start-up; 0: skip")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-search-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    ctx = Context(workdir=workdir, tracker=tracker, experiment="bench-search",
                  parent_run_id=tracker.start_run("bench-search", "pipeline"), log=lambda s: None)
    base = ["data.source=digits", "data.resolution=16", "model.z_dim=16",
            "train.batch_size=64", f"train.kimg={args.kimg}", f"train.log_every_kimg={args.grace_kimg}",
            f"train.checkpoint_every_kimg={args.grace_kimg}", f"train.fid_every_kimg={args.grace_kimg}",
            "eval.evaluator_epochs=4",
            "eval.num_samples=1000", "scale.num_workers=1", "scale.cpus_per_worker=0.4", "tune.cpus_per_trial=0.1",
            "tune.max_concurrent_trials=2",
            f"tune.num_samples={args.trials}", f"tune.grace_kimg={args.grace_kimg}",
            f"tune.reduction_factor={args.reduction_factor}", "tune.seed=0", f"tune.space={SPACE}"]
    probe = load_config(None, base)
    dataset = prepare_stage(ctx, probe)
    evaluator = evaluator_stage(ctx, probe, dataset)

    def search(name: str, *overrides: str) -> tuple[Any, float]:
        cfg = load_config(None, [*base, f"name=bench-{name}", *overrides])
        stage = tracker.start_run("bench-search", name)
        start = time.perf_counter()
        tracking = ray_train_worker.Tracking(tracker.tracking_uri, stage)
        out = ray_tune.tune(cfg, dataset["dataset_dir"], evaluator_dir=evaluator["evaluator_dir"],
                            storage_path=workdir / "ray", tracking=tracking)
        return out, time.perf_counter() - start

    rows, trials, walls = {}, {}, {}
    for scheduler in ("fifo", "asha"):
        out, walls[scheduler] = search(scheduler, f"tune.scheduler={scheduler}")
        cfg = load_config(None, base)
        rows[scheduler] = (sum(t["kimg"] for t in out.trials), out.metrics[ray_tune.score_key(cfg)], walls[scheduler])
        trials[scheduler] = out.trials
    fifo, asha = rows["fifo"], rows["asha"]
    print(f"{args.trials} trials, at most {args.kimg:g} kimg each, digits 16 px, metric train/fid_2k\n")
    print("| search | total trial kimg | best FID | wall s |\n| --- | ---: | ---: | ---: |")
    for name, (kimg, fid, wall) in (("random (FIFO)", fifo), ("ASHA", asha)):
        print(f"| {name} | {kimg:.1f} | {fid:.2f} | {wall:.0f} |")
    print("\nper trial (the same sampled configs in both): kimg trained, best FID")
    print("| trial | random kimg | random FID | ASHA kimg | ASHA FID |\n| --- | ---: | ---: | ---: | ---: |")
    for i, (f, a) in enumerate(zip(trials["fifo"], trials["asha"], strict=True)):
        fid = [f"{t['best_metric']:.2f}" if t["best_metric"] is not None else t["status"] for t in (f, a)]
        print(f"| {i} | {f['kimg']:.1f} | {fid[0]} | {a['kimg']:.1f} | {fid[1]} |")
    saving, gap = fifo[0] / asha[0], asha[1] / fifo[1] - 1
    print(f"\ncompute ratio random/ASHA: {saving:.2f}x; ASHA's best FID vs random's: {gap:+.1%}")
    print(f"target (>= 3x less compute, best FID within 10%): {'PASS' if saving >= 3 and gap <= 0.10 else 'MISS'}")
    breakdowns = {"random (FIFO)": (trials["fifo"], walls["fifo"]), "ASHA": (trials["asha"], walls["asha"])}
    if args.two_worker_trials:
        out, wall = search("two-workers", "tune.scheduler=fifo", f"tune.num_samples={args.two_worker_trials}",
                           f"train.kimg={args.grace_kimg}", "scale.num_workers=2", "tune.max_concurrent_trials=1")
        breakdowns["2-worker trials (FIFO, one at a time)"] = (out.trials, wall)
    print_breakdowns(breakdowns, slots={"2-worker trials (FIFO, one at a time)": 1})
    ray.shutdown()


def print_breakdowns(searches: dict[str, tuple[list[dict[str, Any]], float]], slots: dict[str, int]) -> None:
    """Seconds summed over each search's trials by phase; `idle` is the slot-seconds no trial held (Tune scheduling,
    trial processes starting before their first trial, slots left empty at the end)."""
    print("\nwhere the time went, seconds summed over trials (2 trial slots unless said)")
    print(f"| search | wall s | trials | {' | '.join(PHASES)} | idle | training share | overhead/trial median | max |")
    print(f"| --- | ---: | ---: | {' | '.join('---:' for _ in PHASES)} | ---: | ---: | ---: | ---: |")
    for name, (trials, wall) in searches.items():
        timed = [t["seconds"] for t in trials if t["seconds"].get("total")]
        total = {p: sum(s[p] for s in timed) for p in PHASES}
        capacity = slots.get(name, 2) * wall
        idle = capacity - sum(s["total"] for s in timed)
        overhead = [s["startup"] + s["teardown"] for s in timed] or [float("nan")]
        print(f"| {name} | {wall:.0f} | {len(timed)}/{len(trials)} | {' | '.join(f'{total[p]:.0f}' for p in PHASES)} "
              f"| {idle:.0f} | {total['train'] / capacity:.0%} | {statistics.median(overhead):.1f} | "
              f"{max(overhead):.1f} |")
    print("training share: training seconds over slot-seconds (slots x wall); overhead: start-up + teardown")


if __name__ == "__main__":
    main()
