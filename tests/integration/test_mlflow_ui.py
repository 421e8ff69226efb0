"""The MLflow UI as the place to choose a generator, checked through the store it reads (SQLite, MlflowClient): the
experiment opens in the training view, the Models tab lists generators with metrics that sort (the champion first),
the pipeline run carries the final metrics, its dataset and a description, and train runs get system metrics."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from gan.config_loader import load_config
from pipelines.model_registry import CHAMPION
from pipelines.registration import register_stage, registration_decision
from pipelines.stages import Context, evaluate_stage
from pipelines.tracking import EXPERIMENT_KIND, Tracker, default_tracking_uri
from pipelines.workflow import record_outcome, run_pipeline
from tests.integration.test_evaluation_stages import train_in_process

pytestmark = pytest.mark.integration
NAME = "ui"


def digits_overrides(kimg: float) -> list[str]:
    """16 px digits, a tiny MLP on one worker, a 300-sample FID."""
    return [f"name={NAME}", f"register.model_name=gan-{NAME}", "data.source=digits", "data.resolution=16",
            "model.hidden=[32]", "model.z_dim=16", "train.batch_size=32", f"train.kimg={kimg}",
            "train.log_every_kimg=0.5", "train.checkpoint_every_kimg=0.5", "eval.num_samples=300",
            "eval.evaluator_epochs=2", "scale.num_workers=1", "scale.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def pipelines(ray_session, tmp_path_factory):
    """Two pipeline runs over one store, so the registry decides between two versions scored by one evaluator: the
    whole pipeline on Ray, then (to save a TorchTrainer start) its stages in process for a longer-trained G."""
    workdir = tmp_path_factory.mktemp("ui") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        first = run_pipeline(load_config(None, digits_overrides(0.5)), workdir, log=lambda _: None)
    tracker = Tracker(default_tracking_uri(workdir))
    parent = tracker.start_run(NAME, "pipeline-in-process", tags={"stage": "pipeline"})
    ctx = Context(workdir=workdir, tracker=tracker, experiment=NAME, parent_run_id=parent, log=lambda _: None)
    cfg = load_config(None, digits_overrides(2))
    done = {"prepare": first["dataset"], "evaluator": first["evaluator"]}
    done["train"] = train_in_process(cfg, first["dataset"]["dataset_dir"], workdir / "in-process")
    done["evaluate"] = evaluate_stage(ctx, cfg, done["prepare"], done["evaluator"], done["train"])
    done["register"] = register_stage(ctx, cfg, done["prepare"], done["evaluator"], done["train"], done["evaluate"])
    with tracker.ending(parent):
        record_outcome(tracker, parent, done)
    second = {"pipeline_run_id": parent, "dataset": done["prepare"], "evaluated": done["evaluate"],
              "registered": done["register"]}
    return tracker, [first, second]


def test_experiment_opens_in_the_training_view_and_a_chosen_kind_stays(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run("kind", "pipeline")
    assert tracker.client.get_experiment_by_name("kind").tags[EXPERIMENT_KIND] == "custom_model_development"
    # The UI 3.17 picks its view from the browser, not the tag: the links the pipeline prints select it.
    assert tracker.run_url(run_id).endswith(f"/runs/{run_id}?workflowType=machine_learning")
    # Made elsewhere without the tag (or left to the UI's guess): tagged on next use. A kind someone set stays.
    for name, kind, expected in (("untagged", None, "custom_model_development"),
                                 ("guessed", "genai_development_inferred", "custom_model_development"),
                                 ("chosen", "genai_development", "genai_development")):
        exp_id = tracker.client.create_experiment(name, tags={EXPERIMENT_KIND: kind} if kind else None)
        tracker.start_run(name, "pipeline")
        assert tracker.client.get_experiment(exp_id).tags[EXPERIMENT_KIND] == expected, name


def test_models_tab_sorted_by_fid_under_the_champions_evaluator_lists_the_champion_first(pipelines):
    tracker, _ = pipelines
    champion = tracker.client.get_model_version_by_alias(f"gan-{NAME}", CHAMPION)
    fid_key, evaluator = champion.tags["score_metric"], champion.tags["evaluator_id"]
    assert fid_key == "eval/fid_300"
    experiment = tracker.client.get_experiment_by_name(NAME).experiment_id
    found = tracker.client.search_logged_models(
        [experiment], filter_string=f"tags.evaluator_id = '{evaluator}' AND tags.score_metric = '{fid_key}'",
        order_by=[{"field_name": f"metrics.{fid_key}", "ascending": True}])
    assert len(found) == 2 and champion.source == f"models:/{found[0].model_id}"
    fids = [{m.key: m.value for m in model.metrics}[fid_key] for model in found]
    assert fids == sorted(fids) and fids[0] == pytest.approx(float(champion.tags["fid"]))
    for model in found:
        keys = {m.key for m in model.metrics}
        assert {fid_key, "eval/is_300", "eval/kid_300", "eval/precision_300", "eval/recall_300"} <= keys
        assert any(k.startswith("eval/fid_floor_") for k in keys) and not any(k.startswith("perf/") for k in keys)
        assert {m.dataset_name for m in model.metrics} == {found[0].metrics[0].dataset_name}, "measured on one dataset"
        artifacts = [a.path for a in tracker.client.list_logged_model_artifacts(model.model_id)]
        assert "samples.png" in artifacts and "MLmodel" in artifacts


def test_pipeline_run_carries_the_final_metrics_its_dataset_and_the_decision(pipelines):
    tracker, outs = pipelines
    for out in outs:
        run = tracker.run(out["pipeline_run_id"])
        evaluated = out["evaluated"]["metrics"]
        floor = next(k for k in evaluated if k.startswith("eval/fid_floor_"))
        for key in ("eval/fid_300", "eval/is_300", "eval/kid_300", "eval/precision_300", "eval/recall_300", floor):
            assert run.data.metrics[key] == pytest.approx(evaluated[key]), key
        (dataset_input,) = run.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.digest) == (out["dataset"]["dataset_id"], out["dataset"]["dataset_hash"][:36])
        assert out["dataset"]["dataset_dir"] in dataset.source and '"train_count"' in dataset.profile
        note = run.data.tags["mlflow.note.content"]
        registered = out["registered"]
        verdict = "champion" if registered["is_champion"] else "challenger"
        assert f"gan-{NAME} version {registered['version']}: {verdict}" in note and floor in note
    # The first version had no rival; the second either beat it or did not, and says which.
    first, second = (o["registered"] for o in outs)
    assert first["is_champion"] and "there was no comparable champion" in first["decision"]
    assert ("beats version 1" if second["is_champion"] else "does not beat the champion, version 1") in \
        second["decision"]


def test_registered_versions_come_from_the_run_with_the_metrics_and_say_why(pipelines):
    tracker, outs = pipelines
    for out in outs:
        version = tracker.client.get_model_version(f"gan-{NAME}", out["registered"]["version"])
        source = tracker.run(version.run_id)
        assert source.data.tags["stage"] == "register"
        assert source.data.metrics["eval/fid_300"] == pytest.approx(float(version.tags["fid"]))
        assert version.description == out["registered"]["decision"]
        assert "`eval/fid_300` = " in version.description and "real-data floor `eval/fid_floor_" in \
            version.description
        assert version.description.startswith("Champion at" if out["registered"]["is_champion"] else
                                              "Challenger at")


def test_the_decision_says_why_for_each_way_the_alias_can_go():
    def version(n: int, score: float, **tags: str) -> SimpleNamespace:
        return SimpleNamespace(version=n, tags={"evaluator_id": "ev", "score_metric": "eval/fid_300",
                                                "score": repr(score), **tags})

    def decide(fid: float, champion: str, *first_tags: tuple[str, str]) -> str:
        metrics = {"eval/fid_300": fid, "eval/fid_floor_300": 2.0}
        return registration_decision(metrics, "ev", "2", champion, "1", [version(1, 10.0, **dict(first_tags)),
                                                                         version(2, fid)])

    assert decide(20.0, "1") == (
        "Challenger at registration: `eval/fid_300` = 20 against the real-data floor `eval/fid_floor_300` = 2 "
        "(evaluator `ev`, lower is better); it does not beat the champion, version 1 (`eval/fid_300` = 10).")
    assert "it beats version 1, the champion until then (`eval/fid_300` = 10)" in decide(5.0, "2")
    assert "version 1, is pinned" in decide(5.0, "1", ("pinned", "true"))
    assert "compete only when scored alike" in decide(5.0, "1", ("evaluator_id", "old"))
    # A champion of another evaluator re-scored under this one competes with its re-score.
    assert "does not beat the champion, version 1 (`eval/fid_300` = 3)" in \
        decide(5.0, "1", ("evaluator_id", "old"), ("rescored/ev/eval/fid_300", "3.0"))
    assert "moves only by hand" in decide(5.0, "1")


def test_system_metrics_are_logged_by_mlflows_monitor(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run("system", "train")
    with tracker.system_metrics(run_id, interval_s=0.2):
        time.sleep(1.5)
    metrics = tracker.run(run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert len(tracker.metric_history(run_id, "system/cpu_utilization_percentage")) >= 2


def test_a_run_without_psutil_still_runs_unmonitored(tmp_path, monkeypatch):
    import sys

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run("system", "train")
    for module in [m for m in sys.modules if m == "psutil" or m.startswith("mlflow.system_metrics")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    with tracker.system_metrics(run_id, interval_s=0.1):
        ran = True
    assert ran and not any(k.startswith("system/") for k in tracker.run(run_id).data.metrics)
