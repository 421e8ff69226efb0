"""The register stage over a real SQLite MLflow store, without Ray: a champion scored under another evaluator is
re-scored before the election, and a name holding another data shape refuses a model before anything is logged."""

from __future__ import annotations

import dataclasses

import pytest

from gan.config_loader import load_config
from pipelines.model_registry import CHAMPION, ShapeError, rescored_tag
from pipelines.registration import register_stage
from pipelines.stages import StageError, evaluate_stage, evaluator_stage, prepare_stage
from tests.integration.test_evaluation_stages import train_in_process

pytestmark = pytest.mark.integration


def digits(*extra: str):
    return load_config(None, ["name=reg", "register.model_name=gan-reg", "data.source=digits", "data.resolution=16",
                              "model.hidden=[32]", "model.z_dim=16", "train.batch_size=32", "train.kimg=0.5",
                              "eval.num_samples=300", "eval.evaluator_epochs=1", *extra])


def _register(ctx, cfg, tmp_path, tag):
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    trained = train_in_process(cfg, dataset["dataset_dir"], tmp_path / tag)
    evaluated = evaluate_stage(ctx, cfg, dataset, evaluator, trained)
    return evaluator, register_stage(ctx, cfg, dataset, evaluator, trained, evaluated)


def test_a_new_evaluator_rescores_the_champion_before_the_election(stage_context, tmp_path):
    ctx = stage_context
    lines = []
    ctx = dataclasses.replace(ctx, log=lines.append)
    first_evaluator, first = _register(ctx, digits(), tmp_path, "a")
    assert first["is_champion"] and first["version"] == "1"
    second_evaluator, second = _register(ctx, digits("eval.evaluator_epochs=2", "train.seed=1"), tmp_path, "b")
    assert second_evaluator["evaluator_id"] != first_evaluator["evaluator_id"]
    tags = {str(v.version): v.tags for v in ctx.tracker.model_versions("gan-reg")}
    rescored = tags["1"][rescored_tag(second_evaluator["evaluator_id"], "eval/fid_300")]
    assert float(rescored) > 0
    assert any("champion version 1" in line and "re-scored under evaluator" in line for line in lines), lines
    assert "was re-scored under evaluator" in second["decision"]
    # Compared like with like: the champion is whichever of the two scores lower under the new evaluator.
    better = "2" if float(tags["2"]["score"]) < float(rescored) else "1"
    assert ctx.tracker.alias_version("gan-reg", CHAMPION) == better == second["champion_version"]


def test_a_name_of_another_data_shape_refuses_the_model_before_logging_it(stage_context, tmp_path):
    ctx = stage_context
    _register(ctx, digits(), tmp_path, "a")
    experiment = ctx.tracker.client.get_experiment_by_name("tests").experiment_id
    logged = len(ctx.tracker.client.search_logged_models([experiment]))
    with pytest.raises(StageError, match=r"gan-reg holds generators of data shape 1x16x16, this one is 1x8x8") as err:
        _register(ctx, digits("data.resolution=8"), tmp_path, "b")
    assert isinstance(err.value.__cause__, ShapeError)
    assert len(ctx.tracker.model_versions("gan-reg")) == 1
    assert len(ctx.tracker.client.search_logged_models([experiment])) == logged
