"""Quickstart benchmark: `python -m pipelines run --config configs/quickstart.yaml` in a fresh process and work folder,
round by round, its wall time, train stage time and champion FID; with --baseline, another checkout of the project
(for example the commit before a change) alternates with this one."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quickstart(workdir: Path, *, repo: Path = REPO, storage: str | None = None, env: dict[str, str] | None = None,
                   overrides: tuple[str, ...] = ()) -> tuple[float, str]:
    """Seconds and output of one quickstart run of the checkout at `repo` (a fresh local Ray, SQLite MLflow: by
    default without the caller's AWS_*, MLFLOW_* and RAY_ADDRESS)."""
    cmd = [sys.executable, "-m", "pipelines", "run", "--config", "configs/quickstart.yaml", "--workdir", str(workdir),
           *(["--storage", storage] if storage else []), *[a for o in overrides for a in ("--set", o)]]
    # PYTHONPATH first: the checkout's own code, in the driver and in every Ray worker it starts.
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env = {**env, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def _found(pattern: str, output: str) -> float:
    match = re.search(pattern, output)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to alternate with this one")
    args = parser.parse_args()
    variants = {"this checkout": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        for round_ in range(args.rounds):
            for name, repo in variants.items():
                seconds, output = run_quickstart(Path(tmp) / f"{name.replace(' ', '-')}-{round_}", repo=repo)
                train = _found(r"\[train\] finished in ([\d.]+)s", output)
                fid = _found(r"\"eval/fid_\d+\": ([\d.]+)", output)
                rows[name].append((seconds, train, fid))
                print(f"round {round_ + 1}: {name:13s} {seconds:6.1f} s  (train stage {train:6.1f} s)  "
                      f"champion FID {fid:.2f}", flush=True)
    for name, values in rows.items():
        walls, trains, fids = zip(*values, strict=True)
        print(f"{name:13s} median {statistics.median(walls):6.1f} s  (train stage {statistics.median(trains):6.1f} s), "
              f"champion FID median {statistics.median(fids):.2f}; rounds: {', '.join(f'{w:.1f}' for w in walls)}")


if __name__ == "__main__":
    main()
