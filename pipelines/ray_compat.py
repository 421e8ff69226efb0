"""The one place that touches what Ray does not promise to keep: internal modules and methods, behaviour read from
Ray 2.60's source, and Ray's environment switches. Each entry says why it is needed and why no public way does
instead. `problems()` checks every entry against the installed Ray (a unit test runs it and names what moved), and
`version_problems()` refuses a Ray or MLflow outside the tested range before Ray starts.

Public ways weighed and not taken:
- Ray Train's own placement-group cleaner frees a dead Train run's workers only through the State API, which a Ray
  started without its dashboard lacks: a search frees its trials' worker groups itself (`placement_group_from_hex`).
- `ray.tune.integration.ray_train.TuneReportCallback` forwards only a checkpoint's path in 2.60, so Tune would hold
  no checkpoint for PBT to exploit or for a resumed search: `ray_train.ForwardReports` re-reports with one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
from typing import Any

TESTED_RAY = (2, 60)
"""The Ray minor version whose behaviour this module and DESIGN.md record."""
TESTED_MLFLOW = ((3, 17), (4, 0))
"""MLflow versions tested: from the first to before the second (public API only)."""
ALLOW_UNTESTED_ENV = "RAYGAN_ALLOW_UNTESTED_VERSIONS"
"""Set to 1 to run on versions outside the tested range anyway (the checks below then name what broke)."""

RAY_DATA_READ_CPUS = 1.0
"""CPUs a Train run that streams Parquet leaves free: Ray Data's read tasks each ask for a whole CPU by default and
never schedule with less (two 0.75-CPU workers on 2 CPUs hang forever)."""

SLOW_TRIAL_STOP_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}
"""Tune waits this long (default 2 s) for a stopped trial's thread before reusing its process for another trial, and
fails that trial when it times out; the thread still logs its time and ends its MLflow run, slower under load."""

QUIET_TUNE_ENV = {
    # The newer output engine prints its experiment header and result paths even at verbose=0; the older is silent.
    "RAY_AIR_NEW_OUTPUT": "0",
    # A search of short trials snapshots its state often by design; Tune warns each time.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
"""Tune's switches that keep its own output out of a search's (its INFO lines come from the `ray.tune` logger)."""
TUNE_LOGGER, TRAIN_LOGGER = "ray.tune", "ray.train"

_TRAIN_CONTEXT = "ray.train.v2._internal.execution.context"
_TRAIN_CONTROLLER = "ray.train.v2._internal.execution.controller.controller"


def quiet_train_report_log() -> None:
    """Ray Train V2 logs every report of every worker at INFO ("Reporting training result ...") under a logger
    named by its module's file path, which LoggingConfig(log_level="WARNING") does not reach; our own progress line
    says it."""
    context = importlib.import_module(_TRAIN_CONTEXT)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def abort_train_run() -> None:
    """From inside a Train UserCallback (which runs in the Train controller actor): ends the run and its workers the
    way Ctrl+C on a driver does. Train has no public call for it; the controller's `abort` is what its driver uses."""
    import ray

    ray.get_runtime_context().current_actor.abort.remote()


def current_placement_group_hex() -> str:
    """The id of the placement group the calling Train worker runs in ('' outside one): Train places its workers in
    one group per run, which a search may have to remove itself (see the module's notes)."""
    import ray

    group = ray.util.get_current_placement_group()
    return group.id.hex() if group else ""


def placement_group_from_hex(group_id: str) -> Any:
    """A handle on a placement group known only by its id (written by the run's rank 0): Ray offers no public lookup
    by id, so the handle is built from the id's bytes."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))


def print_unforwarded(line: str) -> None:
    """Prints from a Train worker once: Train tees a print to its wrapped sys.stdout into the driver's output and the
    worker's, so the line would show twice; the process's original stdout is forwarded once, by Ray's log monitor."""
    print(line, file=sys.__stdout__, flush=True)


def version_problems(ray_version: str, mlflow_version: str) -> list[str]:
    """What is wrong with these versions for this project (empty when both are in the tested range)."""
    out = []
    ray_minor = tuple(int(p) for p in ray_version.split(".")[:2])
    if ray_minor != TESTED_RAY:
        out.append(f"Ray {ray_version} is installed; this project is tested on Ray "
                   f"{'.'.join(map(str, TESTED_RAY))}.x and uses Ray internals that move between versions (all in "
                   f"pipelines/ray_compat.py): install ray=={'.'.join(map(str, TESTED_RAY))}.0")
    mlflow_minor = tuple(int(p) for p in mlflow_version.split(".")[:2])
    low, high = TESTED_MLFLOW
    if not low <= mlflow_minor < high:
        out.append(f"MLflow {mlflow_version} is installed; this project is tested on MLflow >= "
                   f"{'.'.join(map(str, low))}, < {'.'.join(map(str, high))}")
    return out


def check_versions() -> None:
    """Raises RuntimeError naming each installed version outside the tested range, unless RAYGAN_ALLOW_UNTESTED_VERSIONS
    is set."""
    found = version_problems(importlib.metadata.version("ray"), importlib.metadata.version("mlflow"))
    if found and os.environ.get(ALLOW_UNTESTED_ENV, "").strip() not in ("1", "true", "yes"):
        raise RuntimeError("; ".join(found) + f" (or set {ALLOW_UNTESTED_ENV}=1 to try anyway)")


def problems() -> list[str]:
    """Each entry of this module checked against the installed Ray: what moved, by name (empty when nothing did)."""
    out = []

    def expect(what: str, ok: Any) -> None:
        try:
            if not ok():
                out.append(what)
        except Exception as err:  # an import or attribute that moved
            out.append(f"{what} ({type(err).__name__}: {err})")

    expect(f"{_TRAIN_CONTEXT} importable, with a __file__ (quiet_train_report_log)",
           lambda: importlib.import_module(_TRAIN_CONTEXT).__file__)
    expect(f"{_TRAIN_CONTROLLER}.TrainController.abort (abort_train_run)",
           lambda: callable(importlib.import_module(_TRAIN_CONTROLLER).TrainController.abort))
    expect("ray.util.get_current_placement_group (current_placement_group_hex)",
           lambda: callable(importlib.import_module("ray.util").get_current_placement_group))
    expect("ray.PlacementGroupID and ray.util.placement_group.PlacementGroup (placement_group_from_hex)",
           lambda: placement_group_from_hex("00" * 18) is not None)
    expect("Tune's FunctionTrainable.reset_config reads TUNE_FUNCTION_THREAD_TIMEOUT_S (SLOW_TRIAL_STOP_ENV)",
           lambda: _source_mentions("ray.tune.trainable.function_trainable", "TUNE_FUNCTION_THREAD_TIMEOUT_S"))
    expect("Tune's output engine reads RAY_AIR_NEW_OUTPUT (QUIET_TUNE_ENV)",
           lambda: _source_mentions("ray.tune.experimental.output", "RAY_AIR_NEW_OUTPUT"))
    expect("Tune reads TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S (QUIET_TUNE_ENV)",
           lambda: _source_mentions("ray.tune.execution.experiment_state",
                                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"))
    return out


def _source_mentions(module: str, text: str) -> bool:
    with open(importlib.import_module(module).__file__, encoding="utf-8") as f:
        return text in f.read()
