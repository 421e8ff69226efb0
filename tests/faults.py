"""Faults made from outside the code under test, as they happen to users: a Ray Train worker process killed, a
search's driver interrupted like Ctrl+C (each watches MLflow from a thread of the test process and acts once), and
a learning rate that really diverges."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.tracking import Tracker

DIVERGING_LR = 1.0e30
"""An optim.lr_d that overflows D's weights within a few Adam steps: a run whose losses turn non-finite and stay so
(its steps are skipped), which ends in NonFiniteLossError after train.nonfinite_patience steps. (As optim.lr_g alone
it does not: G's tanh output saturates instead.)"""


def ray_worker_pids(actor_class: str) -> list[int]:
    """Pids of this machine's Ray worker processes running an actor of `actor_class` (Ray titles them
    `ray::<class>...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::{actor_class}"):
            pids.append(int(proc.name))
    return pids


class Watcher(threading.Thread):
    """Polls `ready()` every half second and runs `act()` once when it holds (or gives up after `timeout_s`)."""

    def __init__(self, ready: Callable[[], bool], act: Callable[[], None], timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.ready, self.act, self.timeout_s = ready, act, timeout_s
        self.done, self.stopped = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Never act from now on (the code under test has returned)."""
        self.stopped.set()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline and not self.stopped.is_set():
                if self.ready():
                    self.act()
                    self.done.set()
                    return
                time.sleep(0.5)
        except BaseException as err:  # reported by the test through .error
            self.error = err


def kill_a_train_worker_after(tracker: Tracker, experiment: str, kimg: float) -> Watcher:
    """SIGKILLs one RayTrainWorker process once the experiment's running train stage has logged `kimg`. Ray Train's
    controller collects reports on a 2 s poll, so a checkpoint reported less than that before the kill may be lost
    with the worker: put `kimg` a few checkpoints past the one a test expects the run to resume from."""
    def ready() -> bool:
        for run in tracker.find_runs(experiment, {"stage": "train"}, status="RUNNING"):
            history = tracker.metric_history(run.info.run_id, "progress/kimg")
            if history and max(m.value for m in history) >= kimg:
                return True
        return False

    def act() -> None:
        pids = ray_worker_pids("RayTrainWorker")
        if not pids:
            raise RuntimeError("no RayTrainWorker process to kill")
        os.kill(max(pids), signal.SIGKILL)

    watcher = Watcher(ready, act)
    watcher.start()
    return watcher


def interrupt_after_finished_trials(tracker: Tracker, experiment: str, parent_run_id: str, count: int) -> Watcher:
    """Sends this process SIGUSR1, which Tune takes as Ctrl+C, once `count` trial runs under `parent_run_id` have
    FINISHED."""
    def ready() -> bool:
        runs = tracker.find_runs(experiment, {"stage": "trial", "mlflow.parentRunId": parent_run_id},
                                 status="FINISHED")
        return len(runs) >= count

    watcher = Watcher(ready, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    watcher.start()
    return watcher
