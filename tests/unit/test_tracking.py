"""Tracker.ending: how a run ends is decided in one place, against a real SQLite MLflow store."""

import pytest

from pipelines.tracking import Tracker


def test_a_run_ends_finished_failed_with_its_error_or_stays_running(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ok, bad, stopped = (tracker.start_run("t", name) for name in ("ok", "bad", "stopped"))
    with tracker.ending(ok):
        pass
    with pytest.raises(ValueError), tracker.ending(bad):
        raise ValueError("lr too high")
    with pytest.raises(SystemExit), tracker.ending(stopped, failed=(Exception,)):
        raise SystemExit(0)  # what tune.report raises in a trial Tune stops
    assert tracker.run(ok).info.status == "FINISHED"
    assert tracker.run(bad).info.status == "FAILED" and tracker.run(bad).data.tags["error"] == "ValueError: lr too high"
    assert tracker.run(stopped).info.status == "RUNNING"
