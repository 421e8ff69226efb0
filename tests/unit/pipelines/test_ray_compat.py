"""The seam for Ray's internals holds against the installed Ray, and versions outside the tested range are named."""

import pytest

from pipelines import ray_compat
from pipelines.cli import main


def test_every_ray_internal_the_project_relies_on_is_where_the_seam_expects_it():
    assert ray_compat.problems() == [], "Ray moved what pipelines/ray_compat.py relies on"


def test_a_moved_internal_is_named(monkeypatch):
    monkeypatch.setattr(ray_compat, "_TRAIN_CONTROLLER", "ray.train.v2._internal.execution.no_such_controller")
    found = ray_compat.problems()
    assert len(found) == 1 and "no_such_controller.TrainController.abort (abort_train_run)" in found[0], found


@pytest.mark.parametrize(("ray_version", "mlflow_version", "expected"), [
    ("2.60.0", "3.17.2", []),
    ("2.60.1", "3.99.0", []),
    ("2.61.0", "3.17.2", ["Ray 2.61.0 is installed"]),
    ("2.48.0", "3.0.1", ["Ray 2.48.0 is installed", "MLflow 3.0.1 is installed"]),
    ("2.60.0", "4.0.0", ["MLflow 4.0.0 is installed"]),
])
def test_versions_outside_the_tested_range_are_named(ray_version, mlflow_version, expected):
    found = ray_compat.version_problems(ray_version, mlflow_version)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True)), found


def test_the_cli_refuses_an_untested_ray_before_anything_runs(monkeypatch, capsys):
    versions = {"ray": "2.61.0", "mlflow": "3.17.2"}
    monkeypatch.setattr(ray_compat.importlib.metadata, "version", versions.__getitem__)
    monkeypatch.delenv(ray_compat.ALLOW_UNTESTED_ENV, raising=False)
    assert main(["run", "--config", "configs/quickstart.yaml", "--storage", "/nonexistent/never-probed"]) == 2
    err = capsys.readouterr().err
    assert "version error: Ray 2.61.0 is installed" in err and "install ray==2.60.0" in err
    monkeypatch.setenv(ray_compat.ALLOW_UNTESTED_ENV, "1")
    ray_compat.check_versions()  # allowed on request
