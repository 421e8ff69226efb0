"""Registry rules against a real SQLite MLflow store: the gate, version tags, the name's data shape, and who holds
`champion` (only versions scored alike compete; a person's pin holds)."""

import numpy as np
import pytest
import torch

from gan.config_loader import load_config
from gan.data.sources import MODE_SIGMA, mode_centres
from gan.export import served_generator
from gan.metrics.modes import mode_stats
from pipelines.model_registry import (
    AUTOENCODER,
    CHALLENGER,
    CHAMPION,
    CLASSIFIER,
    GENERATOR,
    PINNED,
    GateError,
    ShapeError,
    check_gate,
    check_kind,
    check_shape,
    elect_champion,
    kind_of,
    model_name,
    rescored_tag,
    score_of,
    version_tags,
)
from pipelines.tracking import Tracker

METRICS = {"eval/fid_2k": 12.5, "eval/is_2k": 8.1, "eval/kid_2k": 0.9, "eval/kid_std_2k": 0.1,
           "eval/precision_2k": 0.7, "eval/recall_2k": 0.6, "eval/fid_floor_2k": 1.5, "eval_raw/fid_2k": 20.0}


def test_score_is_the_registered_generators_fid_not_the_floor_or_raw_g():
    assert score_of(METRICS) == ("eval/fid_2k", 12.5)
    assert score_of({"eval/reverse_kl": 0.03, "eval/mode_gap": 0.05}) == ("eval/mode_gap", 0.05)
    with pytest.raises(KeyError, match="eval/fid_<n>"):
        score_of({"eval/is_2k": 3.0})
    with pytest.raises(KeyError, match="eval/mode_gap"):
        score_of({"eval/reverse_kl": 0.03})  # balance alone does not rank 2-D generators


def test_uniform_noise_does_not_outrank_a_generator_on_seven_of_eight_modes():
    rng = np.random.default_rng(0)
    centres, sigma = mode_centres("ring8"), MODE_SIGMA["ring8"]
    noise = rng.uniform(-2.5, 2.5, size=(2500, 2))
    modes = centres[rng.integers(0, 7, size=2500)] + rng.normal(0, sigma, size=(2500, 2))
    noise_stats, modes_stats = mode_stats(noise, centres, sigma), mode_stats(modes, centres, sigma)
    assert noise_stats.reverse_kl < modes_stats.reverse_kl  # what ranked noise first
    assert score_of(noise_stats.as_metrics())[1] > score_of(modes_stats.as_metrics())[1] + 0.5


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


def test_model_name_says_the_dataset_and_its_image_side():
    assert model_name(load_config(overrides=["data.source=digits"])) == "gan-digits-28px"
    assert model_name(load_config(overrides=["data.source=digits", "data.resolution=16"])) == "gan-digits-16px"
    assert model_name(load_config(overrides=["data.source=ring8"])) == "gan-ring8"
    assert model_name(load_config(overrides=["register.model_name=mine"])) == "mine"
    conditional = load_config(overrides=["data.source=digits", "model.family=dcgan", "model.conditional=true"])
    assert model_name(conditional) == "gan-digits-28px-conditional", "a generator taking labels is another model"


def test_each_kind_has_its_name_score_and_direction():
    digits = load_config(overrides=["data.source=digits"])
    assert kind_of(load_config(overrides=["data.source=digits", "model.family=vae"])) is GENERATOR
    ae = load_config(overrides=["data.source=digits", "model.family=ae"])
    assert kind_of(ae) is AUTOENCODER and model_name(ae, AUTOENCODER) == "ae-digits-28px"
    assert model_name(digits, CLASSIFIER) == "classifier-digits-28px"
    assert model_name(load_config(overrides=["register.model_name=mine"]), CLASSIFIER) == "mine-classifier"
    metrics = {**METRICS, "eval/reconstruction_error": 0.02, "eval/sgan_accuracy_100_labels": 0.9,
               "eval/plain_accuracy_100_labels": 0.7}
    assert score_of(metrics, AUTOENCODER) == ("eval/reconstruction_error", 0.02)
    assert score_of(metrics, CLASSIFIER) == ("eval/sgan_accuracy_100_labels", 0.9), "not the plain baseline's"
    assert score_of(metrics, GENERATOR) == ("eval/fid_2k", 12.5), "a VAE's reconstruction error does not rank it"
    with pytest.raises(KeyError, match="eval/reconstruction_error"):
        score_of(METRICS, AUTOENCODER)
    assert CLASSIFIER.beats(0.9, 0.8) and AUTOENCODER.beats(0.01, 0.02) and not GENERATOR.beats(12.5, 12.5)
    tags = version_tags(metrics, CLASSIFIER, evaluator_id="test-split-abc")
    assert tags["model_kind"] == "classifier" and tags["score_order"] == "higher"
    assert tags["accuracy"] == "0.9" and tags["plain_accuracy"] == "0.7"
    assert version_tags(metrics, AUTOENCODER)["reconstruction_error"] == "0.02"
    check_gate(load_config(overrides=["register.max_fid=1"]), metrics, AUTOENCODER)  # the gate is for generators


def test_a_name_holds_one_kind_of_model():
    versions = [_Version("1", {"model_kind": "generator"}), _Version("2", {})]  # untagged: a generator
    check_kind(versions, "gan-digits", GENERATOR)
    with pytest.raises(ShapeError, match=r"gan-digits holds generator models, this one is an autoencoder"):
        check_kind(versions, "gan-digits", AUTOENCODER)


class _Version:
    def __init__(self, version, tags):
        self.version, self.tags = version, tags


def test_a_name_holds_one_data_shape():
    versions = [_Version("1", {"data_shape": "1x28x28"}), _Version("2", {})]
    check_shape(versions, "gan-digits", "1x28x28")
    with pytest.raises(ShapeError, match=r"gan-digits holds generators of data shape 1x28x28, this one is 1x16x16"):
        check_shape(versions, "gan-digits", "1x16x16")


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


def _register(tracker, uri, name, fid, evaluator="ev1", metric="eval/fid_2k", auto=True, kind=GENERATOR):
    version = tracker.register_model(uri, name, version_tags({metric: fid}, kind, evaluator_id=evaluator))
    return version, elect_champion(tracker, name, version, auto=auto)


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


def test_a_classifier_champion_is_the_most_accurate(registry):
    tracker, uri = registry
    name = "classifier-rules"
    accuracy = "eval/sgan_accuracy_100_labels"
    assert _register(tracker, uri, name, 0.80, metric=accuracy, kind=CLASSIFIER) == ("1", "1")
    assert _register(tracker, uri, name, 0.70, metric=accuracy, kind=CLASSIFIER) == ("2", "1")  # less accurate
    assert _register(tracker, uri, name, 0.80, metric=accuracy, kind=CLASSIFIER) == ("3", "1")  # a tie
    assert _register(tracker, uri, name, 0.95, metric="eval/sgan_accuracy_1000_labels",
                     kind=CLASSIFIER) == ("4", "1")  # more labels: another contest
    assert _register(tracker, uri, name, 0.90, metric=accuracy, kind=CLASSIFIER) == ("5", "5")


def test_fids_of_different_sample_counts_do_not_compete(registry):
    tracker, uri = registry
    name = "gan-counts"
    assert _register(tracker, uri, name, 30.0) == ("1", "1")
    assert _register(tracker, uri, name, 5.0, metric="eval/fid_10k") == ("2", "1")  # FID(10k) < FID(2k) by bias
    assert _register(tracker, uri, name, 25.0) == ("3", "3")


def test_a_champion_rescored_under_a_new_evaluator_competes_there(registry):
    tracker, uri = registry
    name = "gan-rescored"
    assert _register(tracker, uri, name, 30.0) == ("1", "1")
    tracker.set_version_tags(name, "1", {rescored_tag("ev2", "eval/fid_2k"): "8.0"})
    assert _register(tracker, uri, name, 9.0, evaluator="ev2") == ("2", "1")  # worse than the champion's re-score
    assert _register(tracker, uri, name, 7.0, evaluator="ev2") == ("3", "3")
    assert _register(tracker, uri, name, 1.0) == ("4", "3")  # the old evaluator's versions no longer compete


def test_a_pinned_champion_or_auto_champion_off_keeps_the_alias(registry):
    tracker, uri = registry
    name = "gan-pinned"
    assert _register(tracker, uri, name, 30.0, auto=False) == ("1", "1")  # the first version still becomes champion
    assert _register(tracker, uri, name, 10.0, auto=False) == ("2", "1")
    tracker.set_alias(name, CHAMPION, "2")  # a person moves the alias in the UI and pins it
    tracker.set_version_tags(name, "2", {PINNED: "true"})
    assert _register(tracker, uri, name, 1.0) == ("3", "2")
    tracker.set_version_tags(name, "2", {PINNED: "false"})
    assert _register(tracker, uri, name, 2.0) == ("4", "3")


def test_loading_the_champion_gives_the_registered_module(registry):
    tracker, uri = registry
    name = "gan-load"
    _register(tracker, uri, name, 1.0)
    module, shapes, _ = tracker.load_generator(f"models:/{name}@{CHAMPION}")
    assert shapes == [(-1, 4)]
    assert module(torch.zeros(3, 4)).shape == (3, 2)
    assert tracker.alias_version("no-such-model", CHAMPION) is None
