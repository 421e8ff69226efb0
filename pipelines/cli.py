"""Command line: `python -m pipelines run --config configs/NAME.yaml [--set key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gan import storage
from gan.config import Config, ConfigError
from gan.config_loader import load_config
from gan.metrics.inception import check_inception_weights
from pipelines import ray_compat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="prepare data and train on Ray, tracked in MLflow")
    _config_arguments(run, "YAML preset, e.g. configs/quickstart.yaml",
                      "local folder of temporary files and of the SQLite MLflow store (when MLFLOW_TRACKING_URI is "
                      "unset)")
    evaluate = sub.add_parser("evaluate", help="score a registered generator on a config's data and evaluator")
    evaluate.add_argument("--model", required=True, help="model URI, e.g. models:/gan-mnist-28px@champion")
    _config_arguments(evaluate, "the YAML preset whose data and eval settings to use",
                      "local folder of the SQLite MLflow store (when MLFLOW_TRACKING_URI is unset)")
    sample = sub.add_parser("sample", help="draw images from a registered generator into a PNG grid",
                            description="A conditional generator's grid has one row per class (every class, or the "
                                        "--class ones), -n images to a row, column j drawn from the same latent in "
                                        "every row; an unconditional one's is a square grid of -n images.")
    sample.add_argument("--model", required=True, help="model URI, e.g. models:/gan-mnist-28px@champion")
    sample.add_argument("-n", "--num", type=int, default=None,
                        help="images per class for a conditional generator (default 8), in all otherwise (default 64)")
    sample.add_argument("--class", dest="classes", type=int, action="append", default=None, metavar="K",
                        help="draw class K only (repeatable, one grid row per class, in the order given; "
                             "conditional generators only; default: every class)")
    sample.add_argument("--out", required=True, help="PNG file to write")
    sample.add_argument("--npy", action="store_true",
                        help="also write the images as OUT.npy (uint8, N x C x H x W, row by row) and, for a "
                             "conditional generator, the class asked of each as OUT.labels.npy")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latents")
    sample.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or runs/)")
    for command in (evaluate, sample):
        command.add_argument("--device", default="cpu", help="torch device to run the generator (and the evaluator) "
                             "on, e.g. cuda or cuda:1 (default cpu)")
    from pipelines import submit as submit_cmd

    submit_cmd.add_arguments(sub.add_parser("submit", help="run a pipeline command on a Ray cluster (Ray Jobs)"))
    return parser


def _config_arguments(parser: argparse.ArgumentParser, config_help: str, workdir_help: str) -> None:
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted name, e.g. optim.lr_g=1e-4 (repeatable)")
    parser.add_argument("--workdir", default="runs", help=workdir_help)
    parser.add_argument("--storage", default=None, metavar="URI",
                        help="storage root of everything the stages produce (datasets, evaluators, checkpoints, Tune "
                             "state): a local folder, file://, s3://BUCKET/PREFIX (S3-compatible: add "
                             "?endpoint_override=http://HOST:PORT, or set AWS_ENDPOINT_URL) or gs://BUCKET/PREFIX; "
                             "default: --workdir")


def _init_ray() -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local" never joins a stale cluster left behind by a killed head. The dashboard (on 127.0.0.1 only)
        # also serves the State API that Ray Train's placement-group cleaner polls.
        ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=True)


def run(cfg: Config, workdir: Path, storage_root: str | None = None) -> dict:
    """The whole pipeline on Ray (RAY_ADDRESS, else a local Ray), its outputs under `storage_root` (default
    `workdir`), tracked in MLflow (MLFLOW_TRACKING_URI, else SQLite under `workdir`)."""
    from pipelines.workflow import run_pipeline

    _init_ray()
    return run_pipeline(cfg, workdir, storage_root=storage_root)


def _summary(cfg: Config, out: dict) -> None:
    from pipelines.stages import metrics_line

    registered, evaluated = out["registered"], out["evaluated"]
    print(f"[pipeline] registered {registered['model_uri']}"
          f"{' (the new champion)' if registered['is_champion'] else ' (challenger)'}; "
          f"champion: {registered['champion_uri']} = version {registered['champion_version']}")
    print(f"[pipeline] evaluation of {evaluated['generator']}: {metrics_line(evaluated['metrics'])}")
    if "decoder_uri" in registered:  # an autoencoder: its decoder of prior samples means nothing, so no `sample`
        print(f"[pipeline] load it: mlflow.pytorch.load_model({registered['champion_uri']!r}) encodes [0, 1] images; "
              f"this version's decoder is {registered['decoder_uri']}")
    else:
        print(f"[pipeline] sample it: python -m pipelines sample --model {registered['champion_uri']} -n 64 "
              f"--out grid.png")
    if "classifier_champion_uri" in registered:
        print(f"[pipeline] its classifier: mlflow.pytorch.load_model({registered['classifier_champion_uri']!r}) "
              f"gives class logits of [0, 1] images")
    print(f"[pipeline] compare runs and pick the champion in the MLflow UI: `make ui` -> http://127.0.0.1:5000 "
          f"(experiment {cfg.name!r}, model {registered['model_name']!r})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "submit":
        from pipelines import submit as submit_cmd

        return submit_cmd.main(args)
    if args.command == "sample":
        from pipelines.sample_command import sample_command

        return sample_command(args)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.eval.inception_weights:
            check_inception_weights(cfg.eval.inception_weights)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        ray_compat.check_versions()
    except RuntimeError as err:
        print(f"version error: {err}", file=sys.stderr)
        return 2
    try:  # from the driver before Ray starts; the pipeline probes every node again once it is connected
        storage.probe(args.storage or args.workdir, f"cli-{os.getpid()}")
    except OSError as err:
        print(f"storage error: {err}", file=sys.stderr)
        return 2
    from pipelines.stages import StageError, metrics_line

    try:
        if args.command == "evaluate":
            from pipelines.workflow import evaluate_registered

            _init_ray()
            out = evaluate_registered(cfg, Path(args.workdir), args.model, storage_root=args.storage,
                                      device=args.device)
            print(f"[evaluate] {args.model}: {metrics_line(out['metrics'])}")
            return 0
        out = run(cfg, Path(args.workdir), args.storage)
    except (StageError, storage.StorageError) as err:
        print(f"[pipeline] FAILED: {err}", file=sys.stderr)
        return 1
    _summary(cfg, out)
    return 0
