"""Search trials that need several workers: each runs a TorchTrainer beside the trial's thread, and the placement
groups of its workers are freed whatever ends the trial."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import ray
from ray import tune as rt
from ray.util.placement_group import remove_placement_group
from ray.util.queue import Empty, Queue

from gan import storage
from gan.config import Config
from gan.loop import NonFiniteLossError
from gan.metrics.in_training import UNSCORED
from pipelines import ray_compat, ray_train, ray_train_worker
from pipelines.ray_train_worker import DIVERGED
from pipelines.tune_trial import TrialClock


def train_on_workers(cfg: Config, setup: dict[str, Any], trial_id: str, tracking: ray_train_worker.Tracking,
                      checkpoint: Any, clock: TrialClock) -> None:
    """A multi-worker trial: a TorchTrainer beside this thread, which turns its scored reports into Tune results.

    Not TuneReportCallback: it forwards only the checkpoint's path, so Tune would hold no checkpoint for PBT to
    exploit or for a resumed search to restore. ForwardReports hands this thread each report to re-report with one."""
    reports, acks = Queue(maxsize=1, actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    run_name = f"{trial_id}-{uuid.uuid4().hex[:8]}"
    group_file = storage.join(setup["train_storage"], f"{run_name}.placement_group")
    train_fs, _ = storage.resolve(setup["train_storage"])
    trainer = ray_train.build_trainer(
        cfg, setup["dataset_dir"], storage_path=setup["train_storage"], run_name=run_name, tracking=tracking,
        max_failures=0, evaluator_dir=setup["evaluator_dir"],
        resume_from=storage.uri_of(setup["search"], checkpoint.path) if checkpoint is not None else None,
        callbacks=[ray_train.ForwardReports(reports, acks)], in_memory_data=True,
        placement_group_file=str(group_file))
    box: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # handed to the trial's thread below
            box["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not reports.empty():
            try:
                item = reports.get(timeout=1.0)
            except Empty:
                continue
            clock.report_arrived(item["metrics"])
            if DIVERGED in item["metrics"]:
                acks.put(True)
                thread.join()
                raise NonFiniteLossError(item["metrics"][DIVERGED], int(item["metrics"]["train/nonfinite_patience"]))
            try:
                scored = setup["metric"] in item["metrics"] and UNSCORED not in item["metrics"]
                if scored and item["checkpoint"]:
                    rt.report(item["metrics"], checkpoint=rt.Checkpoint(item["checkpoint"], filesystem=train_fs))
            except BaseException:  # Tune stopped the trial (ASHA, a PBT exploit, an interrupt): SystemExit
                # This process ends within moments: have the Train run abort, and free its workers ourselves
                # in case it does not get to it (Train's own cleaner needs the dashboard's State API).
                clock.report_done(item["metrics"])
                acks.put(ray_train.ForwardReports.STOP)
                _remove_placement_group(group_file)
                raise
            acks.put(True)
            clock.report_done(item["metrics"])
        thread.join()
    finally:
        _remove_placement_group(group_file)
    if "error" in box:
        raise box["error"]


def _remove_placement_group(group_file: str) -> None:
    """Removes a trial's worker placement group if Ray Train left it. A stopped trial's process is killed with its
    Train controller, and Train's detached cleaner then finds the dead controller through the State API, which a
    Ray without its dashboard lacks: the workers' CPUs stayed reserved and later trials never started."""
    group_id = storage.read_bytes(group_file).decode().strip() if storage.exists(group_file) else ""
    if not group_id:
        return
    group = ray_compat.placement_group_from_hex(group_id)
    if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)


class FreeTrialWorkers(rt.Callback):
    """Removes an ended trial's worker placement groups from the driver: a trial process that Tune ends while it
    is not inside tune.report (an interrupt, a stop between reports) is killed before it can do so itself."""

    def __init__(self, train_storage: str):
        self.train_storage = train_storage

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        free_workers(self.train_storage, trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        free_workers(self.train_storage, trial.trial_id)


def free_workers(train_storage: str, trial_id: str = "") -> None:
    """Removes the placement groups recorded for one trial (all trials when empty) and their records."""
    for name in storage.list_names(train_storage):
        if name.endswith(".placement_group") and name.startswith(f"{trial_id}-" if trial_id else ""):
            group_file = storage.join(train_storage, name)
            _remove_placement_group(group_file)
            storage.delete(group_file)
