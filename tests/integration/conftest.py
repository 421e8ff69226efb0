"""One local Ray for the whole test session (ray.init costs seconds; each TorchTrainer more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.stages import Context
from pipelines.tracking import Tracker


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def stage_context(tmp_path: Path) -> Context:
    """A pipeline context over a fresh SQLite MLflow store in tmp_path, with a parent run."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_run("tests", "pipeline")
    return Context(workdir=tmp_path, tracker=tracker, experiment="tests", parent_run_id=parent)
