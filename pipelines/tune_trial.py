"""What one search trial does besides Tune's bookkeeping: where its time goes (TrialClock)."""

from __future__ import annotations

import time
from typing import Any

import pipelines

PHASES = ("startup", "train", "checkpoint", "score", "report", "teardown")
"""A trial's lifetime, in order: start-up (from the trial's start, or its process's when it is the first trial there,
to its first step), training steps (data included), saving checkpoints and sample grids, in-training scoring,
reporting (MLflow, Tune, copying checkpoints to storage, waiting on Ray Train), and teardown (after its last report)."""

_trials_in_process = 0


def trial_start() -> float:
    """When the calling trial started: now, or for a process's first trial, when the process loaded this package."""
    global _trials_in_process
    _trials_in_process += 1
    return pipelines.LOADED_AT if _trials_in_process == 1 else time.time()


class TrialClock:
    """Splits a trial's lifetime into PHASES from the cumulative `time/*` seconds its reports carry (the loop's
    steps, checkpoint and report times, the scorer's time/score_s) and the moments reports arrive and return."""

    def __init__(self, started: float):
        self.started = started
        self.first_step: float | None = None
        self.last: dict[str, Any] = {}
        self.last_done: float | None = None

    def report_arrived(self, metrics: dict[str, Any]) -> None:
        """A report came in (before anything this side does with it)."""
        if self.first_step is None:
            before = sum(float(metrics.get(f"time/{k}_s", 0.0)) for k in ("steps", "checkpoint", "score"))
            self.first_step = time.time() - before

    def report_done(self, metrics: dict[str, Any]) -> None:
        """That report was handled; `metrics` are its final values (with the current score's time)."""
        self.last, self.last_done = metrics, time.time()

    def summary(self) -> dict[str, float]:
        """time/<phase>_s for every phase and time/trial_s, the lifetime they add up to, as of now."""
        now = time.time()
        life = now - self.started
        if self.first_step is None or self.last_done is None:
            return {"time/trial_s": life, "time/startup_s": life,
                    **{f"time/{p}_s": 0.0 for p in PHASES if p != "startup"}}
        spent = {"startup": self.first_step - self.started, "teardown": now - self.last_done,
                 "train": float(self.last.get("time/steps_s", 0.0)),
                 "checkpoint": float(self.last.get("time/checkpoint_s", 0.0)),
                 "score": float(self.last.get("time/score_s", 0.0))}
        spent["report"] = max(0.0, life - sum(spent.values()))
        return {"time/trial_s": life, **{f"time/{p}_s": spent[p] for p in PHASES}}
