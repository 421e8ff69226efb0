"""What a search prints: our own lines per trial instead of Tune's status tables, unless RAYGAN_RAY_OUTPUT=1."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ray import tune as rt

from pipelines import ray_compat

RAY_OUTPUT_ENV = "RAYGAN_RAY_OUTPUT"
"""Set to 1 to see Ray's own output of a search as well: Tune's status tables and Ray Train's INFO lines."""


def ray_output_wanted() -> bool:
    """Whether RAYGAN_RAY_OUTPUT asks for Ray's own output."""
    return os.environ.get(RAY_OUTPUT_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def search_output() -> Iterator[None]:
    """Around Tuner.fit in the search's driver: Ray's own output off (its environment switches, and Tune's INFO
    lines such as "Wrote the latest version of all result files"), unless RAYGAN_RAY_OUTPUT=1."""
    if ray_output_wanted():
        yield
        return
    saved = {k: os.environ.get(k) for k in ray_compat.QUIET_TUNE_ENV}
    logger = logging.getLogger(ray_compat.TUNE_LOGGER)
    level = logger.level
    os.environ.update(ray_compat.QUIET_TUNE_ENV)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class TrialProgress(rt.Callback):
    """One line when a trial starts (its sampled values), at each scored checkpoint (kimg, img/s, score), and when
    it ends: finished, stopped early by the scheduler, or failed."""

    def __init__(self, metric: str, kimg: float, scheduler: str):
        self.metric, self.kimg, self.scheduler = metric, kimg, scheduler

    @staticmethod
    def _say(trial: Any, text: str) -> None:
        print(f"[search] trial {trial.trial_id} {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        space = trial.config.get("space", {})
        self._say(trial, "started: " + ", ".join(f"{k}={_value(v)}" for k, v in space.items()))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.metric in result:
            self._say(trial, f"{result.get('progress/kimg', 0.0):7.2f} kimg  {result.get('perf/img_per_s', 0.0):6.0f} "
                             f"img/s  {self.metric} {result[self.metric]:.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        kimg = float(trial.last_result.get("progress/kimg", 0.0))
        if kimg >= self.kimg - 1e-9 or self.scheduler == "pbt":
            self._say(trial, f"finished at {kimg:.2f} kimg")
        else:
            self._say(trial, f"stopped by {self.scheduler.upper()} at {kimg:.2f} kimg")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        lines = str(error).strip().splitlines() if error is not None else []
        self._say(trial, f"failed: {lines[-1] if lines else 'see its MLflow run'}")
