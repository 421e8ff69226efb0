"""The pipeline as users run it: five stages as Ray tasks under one MLflow pipeline run, reuse of FINISHED
stages, the registry and its gate, `sample`, and a pipeline killed mid-train and re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from gan.config_loader import load_config
from gan.scoring import generators_from_checkpoint
from pipelines import cli
from pipelines.model_registry import CHAMPION
from pipelines.stages import StageError
from pipelines.tracking import Tracker, default_tracking_uri
from pipelines.workflow import STAGES, evaluate_registered, run_pipeline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STAGE_NAMES = list(STAGES)


def ring8_overrides(tmp_path: Path, name: str, kimg: int = 30) -> list[str]:
    return [f"name={name}", f"register.model_name=gan-{name}",
            "data.num_samples=4000", f"train.kimg={kimg}", "train.log_every_kimg=10", "train.checkpoint_every_kimg=10"]


def stage_runs(tracker: Tracker, experiment: str, parent: str) -> dict[str, object]:
    runs = tracker.find_runs(experiment, {"mlflow.parentRunId": parent})
    return {r.data.tags["stage"]: r for r in runs}


def test_pipeline_registers_once_and_a_rerun_reuses_every_stage(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(ROOT / "configs/ring8.yaml", ring8_overrides(tmp_path, "wf"))
    workdir = tmp_path / "runs"
    lines: list[str] = []
    out = run_pipeline(cfg, workdir, log=lines.append)
    tracker = Tracker(default_tracking_uri(workdir))

    assert tracker.run(out["pipeline_run_id"]).info.status == "FINISHED"
    stages = stage_runs(tracker, "wf", out["pipeline_run_id"])
    assert sorted(stages) == sorted(STAGE_NAMES)
    assert all(r.info.status == "FINISHED" and r.data.tags["stage_key"] for r in stages.values())
    assert stages["prepare"].data.params["data.source"] == "ring8", "prepare logs the data section's params"
    assert not any(k.startswith("data.data.") for k in stages["prepare"].data.params)
    assert [line.split("]")[0][1:] for line in lines if " running as a Ray task " in line] == STAGE_NAMES

    registered = out["registered"]
    assert registered["version"] == "1" and registered["is_champion"]
    assert tracker.alias_version("gan-wf", CHAMPION) == "1"
    (version,) = tracker.model_versions("gan-wf")
    tags = version.tags
    assert tags["score_metric"] == "eval/mode_gap"
    assert float(tags["mode_gap"]) == pytest.approx(out["evaluated"]["metrics"]["eval/mode_gap"])
    assert tags["pipeline_run_id"] == out["pipeline_run_id"]
    assert tags["dataset_hash"] == out["dataset"]["dataset_hash"] and tags["evaluator_id"] == "modes"
    assert len(tags["git_commit"]) >= 7 and len(tags["config_hash"]) == 16 and tags["generator"] == "G_ema"

    # Same inputs: every stage is found FINISHED and reused; no second version.
    lines.clear()
    again = run_pipeline(cfg, workdir, log=lines.append)
    assert [line.split("]")[0][1:] for line in lines if " reused: " in line] == STAGE_NAMES
    assert again["registered"]["version"] == "1" and len(tracker.model_versions("gan-wf")) == 1
    assert stage_runs(tracker, "wf", again["pipeline_run_id"]) == {}

    # The champion as users load it.
    png = tmp_path / "sample.png"
    assert cli.main(["sample", "--model", "models:/gan-wf@champion", "-n", "16", "--out", str(png), "--npy",
                     "--tracking-uri", tracker.tracking_uri]) == 0
    points = np.load(png.with_suffix(".npy"))
    assert png.stat().st_size > 1000 and points.shape == (16, 2)
    gens, trained_cfg, extra = generators_from_checkpoint(out["trained"]["checkpoint_dir"])
    z = torch.randn(16, trained_cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gens["G_ema"](z) * extra["scale"]
    np.testing.assert_allclose(points, expected.numpy(), rtol=1e-4, atol=1e-5)

    # The registered model scored again from its URI gives the evaluate stage's numbers.
    scored = evaluate_registered(cfg, workdir, "models:/gan-wf@champion", log=lines.append)
    for key in ("eval/modes_covered", "eval/high_quality", "eval/mode_gap"):
        assert scored["metrics"][key] == pytest.approx(out["evaluated"]["metrics"][key], abs=2e-3), key

    # A gate the model cannot pass: only the register stage runs again, it fails, nothing is registered.
    gated = load_config(ROOT / "configs/ring8.yaml", [*ring8_overrides(tmp_path, "wf"), "register.max_fid=1e-9"])
    with pytest.raises(StageError, match=r"not registered: eval/mode_gap=.* register.max_fid=1e-09"):
        run_pipeline(gated, workdir, log=lines.append)
    failed = tracker.find_runs("wf", {"stage": "register"}, status="FAILED")
    assert len(failed) == 1 and "register.max_fid" in failed[0].data.tags["error"]
    assert len(tracker.model_versions("gan-wf")) == 1
    assert len(tracker.find_runs("wf", {"stage": "pipeline"}, status="FAILED")) == 1


def test_a_failing_stage_is_marked_failed_and_later_stages_do_not_run(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "empty").mkdir()
    cfg = load_config(None, ["name=broken", "data.source=folder", f"data.root={tmp_path / 'empty'}",
                             "data.resolution=28", "model.family=dcgan"])
    with pytest.raises(StageError, match="stage prepare failed"):
        run_pipeline(cfg, tmp_path / "runs", log=lambda _: None)
    tracker = Tracker(default_tracking_uri(tmp_path / "runs"))
    runs = tracker.find_runs("broken", {})
    assert sorted((r.data.tags["stage"], r.info.status) for r in runs) == [("pipeline", "FAILED"),
                                                                          ("prepare", "FAILED")]


def _checkpoints(workdir: Path) -> list[Path]:
    return sorted((workdir / "ray").glob("*/checkpoint-*"))


def test_pipeline_killed_mid_train_resumes_and_registers_exactly_one_version(mlflow_server, tmp_path):
    """Against a real `mlflow server` (http store), with its own local Ray in the pipeline process."""
    name = f"kill-{uuid.uuid4().hex[:6]}"
    workdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "pipelines", "run", "--config", "configs/ring8.yaml", "--workdir", str(workdir),
           *[arg for o in ring8_overrides(tmp_path, name, kimg=240) for arg in ("--set", o)]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not _checkpoints(workdir) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(4)  # Ray Train V2 registers a reported checkpoint on its next 2 s poll
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    killed_at = _checkpoints(workdir)
    assert killed_at, (tmp_path / "first.log").read_text()[-3000:]

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    tracker = Tracker(mlflow_server)
    assert len(tracker.model_versions(f"gan-{name}")) == 1
    trains = tracker.find_runs(name, {"stage": "train"})
    assert sorted(r.info.status for r in trains) == ["FINISHED", "KILLED"]
    finished = next(r for r in trains if r.info.status == "FINISHED")
    steps = [m.step for m in tracker.metric_history(finished.info.run_id, "progress/kimg")]
    first_checkpoint_images = int(killed_at[0].name.split("-")[1])
    assert min(steps) > first_checkpoint_images, (steps, killed_at)
    assert max(steps) >= 240_000
