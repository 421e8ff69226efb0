"""Search benchmark: ASHA vs random search (FIFO), same trials, seed, budget and data: total kimg and best FID."""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers stall torch badly when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import tempfile
import time
from pathlib import Path

import ray

from gan.config import load_config
from pipelines import ray_train, ray_tune
from pipelines.stages import Context, evaluator_stage, prepare_stage
from pipelines.tracking import Tracker

SPACE = ("{optim.lr_g: {loguniform: [1e-4, 3e-3]}, optim.lr_d: {loguniform: [1e-4, 3e-3]},"
         " optim.beta1: {uniform: [0.0, 0.9]}, model.hidden: {choice: [[64], [128], [128, 128]]}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--kimg", type=float, default=32.0, help="maximum budget per trial")
    parser.add_argument("--grace-kimg", type=float, default=2.0, help="ASHA's first rung; also the scoring interval")
    parser.add_argument("--reduction-factor", type=float, default=4.0)
    parser.add_argument("--workdir", default=None)
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
            f"tune.num_samples={args.trials}", f"tune.grace_kimg={args.grace_kimg}",
            f"tune.reduction_factor={args.reduction_factor}", "tune.seed=0", f"tune.space={SPACE}"]
    probe = load_config(None, base)
    dataset = prepare_stage(ctx, probe)
    evaluator = evaluator_stage(ctx, probe, dataset)
    rows, trials = {}, {}
    for scheduler in ("fifo", "asha"):
        cfg = load_config(None, [*base, f"name=bench-{scheduler}", f"tune.scheduler={scheduler}"])
        stage = tracker.start_run("bench-search", scheduler)
        start = time.perf_counter()
        out = ray_tune.tune(cfg, dataset["dataset_dir"], evaluator_dir=evaluator["evaluator_dir"],
                            storage_path=workdir / "ray", tracking=ray_train.Tracking(tracker.tracking_uri, stage))
        rows[scheduler] = (sum(t["kimg"] for t in out.trials), out.metrics[ray_tune.score_key(cfg)],
                           time.perf_counter() - start)
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
    ray.shutdown()


if __name__ == "__main__":
    main()
