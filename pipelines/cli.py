"""Command line: `python -m pipelines run --config configs/NAME.yaml [--set key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gan.config import Config, ConfigError, flatten, load_config
from gan.metrics.inception import check_inception_weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="prepare data and train on Ray, tracked in MLflow")
    run.add_argument("--config", required=True, help="YAML preset, e.g. configs/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value by its dotted name, e.g. optim.lr_g=1e-4 (repeatable)")
    run.add_argument("--workdir", default="runs", help="folder of the MLflow store and Ray checkpoints")
    return parser


def _init_ray() -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local" never joins a stale cluster left behind by a killed head.
        ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=False)


def run(cfg: Config, workdir: Path) -> dict:
    from pipelines.stages import Context, evaluate_stage, evaluator_stage, prepare_stage, train_stage
    from pipelines.tracking import Tracker, default_tracking_uri

    workdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(default_tracking_uri(workdir))
    parent = tracker.start_run(cfg.name, f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", tags={"stage": "pipeline"})
    tracker.log_params(parent, flatten(cfg))
    print(f"[pipeline] {cfg.name}: MLflow store {tracker.tracking_uri}, run {tracker.run_url(parent)}")
    ctx = Context(workdir=workdir, tracker=tracker, experiment=cfg.name, parent_run_id=parent)
    try:
        _init_ray()
        dataset = prepare_stage(ctx, cfg)
        evaluator = evaluator_stage(ctx, cfg, dataset)
        trained = train_stage(ctx, cfg, dataset)
        evaluated = evaluate_stage(ctx, cfg, dataset, evaluator, trained)
    except BaseException as err:
        tracker.end_run(parent, "FAILED", error=f"{type(err).__name__}: {err}")
        raise
    tracker.end_run(parent, "FINISHED")
    return {"pipeline_run_id": parent, "dataset": dataset, "train": trained, "evaluate": evaluated}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.eval.inception_weights:
            check_inception_weights(cfg.eval.inception_weights)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.command == "run":
        out = run(cfg, Path(args.workdir))
        metrics = {k: round(v, 4) for k, v in sorted(out["evaluate"]["metrics"].items())}
        print(f"[pipeline] done. checkpoint: {out['train']['checkpoint_dir']}")
        print(f"[pipeline] evaluation of {out['evaluate']['generator']}: {json.dumps(metrics)}")
        print(f"[pipeline] open the MLflow UI with `make ui` (http://127.0.0.1:5000), experiment {cfg.name!r}")
    return 0
