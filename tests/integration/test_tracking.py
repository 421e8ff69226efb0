"""MLflow through pipelines/tracking.py against a real SQLite store and a real `mlflow server` process:
concurrent writers lose nothing, and a Ray Train run logs to an http:// store the same way."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from gan.config_loader import load_config
from pipelines.stages import Context, prepare_stage, train_stage
from pipelines.tracking import Tracker

pytestmark = pytest.mark.integration
WRITERS, METRICS = 8, 40


def _writer(uri: str, run_id: str, index: int) -> None:
    tracker = Tracker(uri)
    for step in range(METRICS):
        tracker.log_metrics(run_id, {f"w{index}/value": float(step), "shared/value": float(index)},
                            step=index * METRICS + step)


def _hammer(uri: str) -> tuple[Tracker, list[str]]:
    tracker = Tracker(uri)
    run_ids = [tracker.start_run("concurrency", f"writer-{i}") for i in range(WRITERS)]
    ctx = mp.get_context("fork")  # the children build their own clients; fork skips 8 imports of mlflow
    procs = [ctx.Process(target=_writer, args=(uri, run_ids[i % 2], i)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WRITERS, "a writer failed (see its traceback above)"
    return tracker, run_ids


def _assert_nothing_lost(tracker: Tracker, run_ids: list[str]) -> None:
    for i in range(WRITERS):
        history = tracker.metric_history(run_ids[i % 2], f"w{i}/value")
        assert sorted(m.value for m in history) == [float(s) for s in range(METRICS)], i
    shared = tracker.metric_history(run_ids[0], "shared/value") + tracker.metric_history(run_ids[1], "shared/value")
    assert len(shared) == WRITERS * METRICS


def test_experiments_open_in_the_model_training_view(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_run("kind", "pipeline")
    experiment = tracker.client.get_experiment_by_name("kind")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_eight_processes_log_to_sqlite_without_losing_a_metric(tmp_path):
    tracker, run_ids = _hammer(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _assert_nothing_lost(tracker, run_ids)


def test_eight_processes_log_to_a_tracking_server_without_losing_a_metric(mlflow_server):
    tracker, run_ids = _hammer(mlflow_server)
    _assert_nothing_lost(tracker, run_ids)


def test_ray_train_logs_to_an_http_tracking_server(ray_session, mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server)
    ctx = Context(workdir=tmp_path, tracker=tracker, experiment="http-store",
                  parent_run_id=tracker.start_run("http-store", "pipeline"))
    cfg = load_config(None, ["name=ring-http", "data.source=ring8", "data.num_samples=4000",
                             "model.hidden=[32]", "train.batch_size=64",
                             "train.kimg=1", "train.log_every_kimg=0.5", "train.checkpoint_every_kimg=1",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.5"])
    out = train_stage(ctx, cfg, prepare_stage(ctx, cfg))
    assert tracker.run(out["run_id"]).info.status == "FINISHED"
    assert len(tracker.metric_history(out["run_id"], "loss/d")) == 2
    assert tracker.artifact_paths(out["run_id"], "samples") == ["samples/kimg-00001.024.png"]
    assert Path(out["checkpoint_dir"], "samples.png").is_file()
