"""Storage benchmark: the quickstart pipeline with its storage root on the local disk vs on an S3-compatible bucket
(moto's server on 127.0.0.1), alternating, each round in a fresh process and a fresh work folder."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from bench.quickstart import run_quickstart
from tests.s3 import s3_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="quickstart overrides for both variants (e.g. train.kimg=20 for a smoke run)")
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp, s3_server(Path(tmp)) as s3:
        env = {**base_env, **s3.env}
        times: dict[str, list[float]] = {"local disk": [], "bucket": []}
        for round_ in range(args.rounds):
            for variant in times:
                work = Path(tmp) / f"{variant.replace(' ', '-')}-{round_}"
                storage = s3.uri(f"round-{round_}") if variant == "bucket" else None
                seconds, _ = run_quickstart(work, storage=storage, env=env, overrides=tuple(args.overrides))
                times[variant].append(seconds)
                print(f"round {round_ + 1}: {variant:10s} {seconds:7.1f} s", flush=True)
            print(f"round {round_ + 1}: bucket / local disk = {times['bucket'][-1] / times['local disk'][-1]:.2f}",
                  flush=True)
        print(f"objects in the bucket after the last round: {len(s3.keys(f'round-{args.rounds - 1}/'))}")
        for variant, values in times.items():
            print(f"{variant:10s} median {statistics.median(values):7.1f} s  ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
