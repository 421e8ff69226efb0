"""Registry rules against a real SQLite MLflow store: the gate, version tags, and who holds `champion`."""

import pytest
import torch

from gan.config_loader import load_config
from gan.export import served_generator
from pipelines.model_registry import (
    CHALLENGER,
    CHAMPION,
    GateError,
    check_gate,
    elect_champion,
    model_name,
    score_of,
    version_tags,
)
from pipelines.tracking import Tracker

METRICS = {"eval/fid_2k": 12.5, "eval/is_2k": 8.1, "eval/kid_2k": 0.9, "eval/kid_std_2k": 0.1,
           "eval/precision_2k": 0.7, "eval/recall_2k": 0.6, "eval/fid_floor_2k": 1.5, "eval_raw/fid_2k": 20.0}


def test_score_is_the_registered_generators_fid_not_the_floor_or_raw_g():
    assert score_of(METRICS) == ("eval/fid_2k", 12.5)
    assert score_of({"eval/modes_covered": 8.0, "eval/reverse_kl": 0.03}) == ("eval/reverse_kl", 0.03)
    with pytest.raises(KeyError, match="eval/fid_<n>"):
        score_of({"eval/is_2k": 3.0})


def test_gate_refuses_a_model_above_max_fid_with_the_numbers():
    check_gate(load_config(overrides=["register.max_fid=13"]), METRICS)
    check_gate(load_config(), METRICS)  # 0 disables the gate
    with pytest.raises(GateError, match=r"eval/fid_2k=12.5 fails the gate register.max_fid=10"):
        check_gate(load_config(overrides=["register.max_fid=10"]), METRICS)
    with pytest.raises(GateError):
        check_gate(load_config(overrides=["register.max_fid=10"]), {**METRICS, "eval/fid_2k": float("nan")})


def test_version_tags_carry_metrics_and_lineage():
    tags = version_tags(METRICS, evaluator_id="ev1", dataset_hash="d1", git_commit="abc")
    assert tags["fid"] == "12.5" and tags["is"] == "8.1" and tags["kid"] == "0.9"
    assert tags["precision"] == "0.7" and tags["recall"] == "0.6"
    assert tags["score_metric"] == "eval/fid_2k" and float(tags["score"]) == 12.5
    assert tags["evaluator_id"] == "ev1" and tags["dataset_hash"] == "d1" and tags["git_commit"] == "abc"


def test_model_name_defaults_to_the_dataset():
    assert model_name(load_config(overrides=["data.source=digits"])) == "gan-digits"
    assert model_name(load_config(overrides=["register.model_name=mine"])) == "mine"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tracker = Tracker(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")
    G = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh())
    served = served_generator(_Unconditional(G), z_dim=4, points=True, scale=1.0, conditional=False, num_classes=0)
    run_id = tracker.start_run("registry", "register")
    return tracker, tracker.log_generator(run_id, served, served.example_inputs())


class _Unconditional(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z, y=None):
        return self.net(z)


def _register(tracker, uri, name, fid, evaluator="ev1"):
    version = tracker.register_model(uri, name, version_tags({"eval/fid_2k": fid}, evaluator_id=evaluator))
    return version, elect_champion(tracker, name, version)


def _tags(tracker, name):
    return {str(v.version): v.tags for v in tracker.model_versions(name)}


def test_champion_moves_only_to_a_better_fid_under_the_same_evaluator(registry):
    tracker, uri = registry
    name = "gan-rules"
    assert _register(tracker, uri, name, 30.0) == ("1", "1")  # the first version is the champion
    assert _register(tracker, uri, name, 35.0) == ("2", "1")  # worse: challenger
    assert _register(tracker, uri, name, 30.0) == ("3", "1")  # a tie does not beat the champion
    assert _register(tracker, uri, name, 5.0, evaluator="ev2") == ("4", "1")  # another evaluator: not comparable
    assert _register(tracker, uri, name, 20.0) == ("5", "5")  # better: the alias moves
    assert tracker.alias_version(name, CHAMPION) == "5"
    tags = _tags(tracker, name)
    assert [v for v in sorted(tags) if tags[v].get(CHALLENGER) == "true"] == ["2", "3", "4"]


def test_loading_the_champion_gives_the_registered_module(registry):
    tracker, uri = registry
    name = "gan-load"
    _register(tracker, uri, name, 1.0)
    module, shapes, _ = tracker.load_generator(f"models:/{name}@{CHAMPION}")
    assert shapes == [(-1, 4)]
    assert module(torch.zeros(3, 4)).shape == (3, 2)
    assert tracker.alias_version("no-such-model", CHAMPION) is None
