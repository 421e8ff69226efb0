"""Run health: early stopping on a score plateau, the collapse alarm, and a report that ends training; a diverged run's
error survives the trip between Ray processes."""

import pickle
import shutil

import pytest
import torch

from gan.config import ConfigError
from gan.config_loader import load_config
from gan.data import load_manifest, prepare, read_split, to_model_range
from gan.data.batches import shuffled
from gan.data.labelled import LabelledPool
from gan.loop import DataSpec, NonFiniteLossError, fit
from gan.metrics import save_evaluator, train_evaluator
from gan.metrics.in_training import TOP_CLASS_SHARE, UNSCORED, CheckpointScorer, RunHealth
from pipelines.ray_train_worker import model_batches
from tests.unit.gan.test_loop import SMALL, SPEC, ring_batches

IMAGES = ["data.source=digits", "train.fid_every_kimg=1", "train.checkpoint_every_kimg=1"]


def _observe(health, *reports):
    return [health.observe(r) for r in reports]


def test_a_plateau_of_patience_evals_scores_ends_the_run():
    health = RunHealth(load_config(None, [*IMAGES, "train.patience_evals=2", "train.collapse_class_share=0"]))
    fid = "train/fid_2k"
    out = _observe(health, {fid: 5.0}, {fid: 4.0}, {fid: 4.5}, {fid: float("inf"), UNSCORED: 1.0}, {fid: 4.2})
    assert [stop for _, stop in out] == [False, False, False, False, True]  # the unscored report does not count
    assert all(alarm is None for alarm, _ in out)
    off = RunHealth(load_config(None, [*IMAGES, "train.collapse_class_share=0"]))
    assert not any(stop for _, stop in _observe(off, *[{fid: 5.0}] * 10))


def test_the_collapse_alarm_reads_the_class_histogram_and_the_recall():
    health = RunHealth(load_config(None, IMAGES))
    fid, recall = "train/fid_2k", "train/recall_2k"
    out = _observe(health, {fid: 9.0, recall: 0.2, TOP_CLASS_SHARE: 0.12},
                   {fid: 8.0, recall: 0.5, TOP_CLASS_SHARE: 0.1}, {fid: 7.0, recall: 0.3, TOP_CLASS_SHARE: 0.1},
                   {fid: 7.5, recall: 0.2, TOP_CLASS_SHARE: 0.1},
                   {fid: 6.0, recall: 0.5, TOP_CLASS_SHARE: 0.55})
    alarms = [alarm for alarm, _ in out]
    assert alarms[:3] == [None, None, None]
    assert alarms[3] == "recall fell to 0.200, under half its best 0.500"
    assert alarms[4] == "one class takes 55% of the samples (train.collapse_class_share=0.5)"
    assert not any(stop for _, stop in out), "an alarm alone does not stop the run"
    stopping = RunHealth(load_config(None, [*IMAGES, "train.stop_on_collapse=true"]))
    assert stopping.observe({fid: 6.0, recall: 0.5, TOP_CLASS_SHARE: 0.9})[1]


def test_patience_needs_in_training_scores():
    with pytest.raises(ConfigError, match="train.patience_evals needs train.fid_every_kimg > 0"):
        load_config(None, ["train.patience_evals=3"])


def test_a_report_returning_true_ends_training_there():
    cfg = load_config(None, [*SMALL, "train.kimg=5", "train.batch_size=50", "train.log_every_kimg=1"])
    seen = []

    def report(metrics, checkpoint_dir):
        seen.append(metrics["progress/kimg"])
        return metrics["progress/kimg"] >= 2

    state = fit(cfg, ring_batches(50), spec=SPEC, report=report)
    assert seen == [1.0, 2.0] and state.images == 2000


def test_a_diverged_runs_error_pickles_with_its_message():
    err = pickle.loads(pickle.dumps(NonFiniteLossError(3.25, 5)))
    assert (err.kimg, err.patience) == (3.25, 5)
    assert str(err).startswith("non-finite loss or gradient in 5 steps in a row at 3.250 kimg")


def test_a_semi_supervised_checkpoint_is_also_scored_as_a_classifier_on_the_held_out_split(tmp_path):
    cfg = load_config(None, ["data.source=digits", "data.resolution=16", "model.hidden=[32]", "model.z_dim=8",
                             "model.semi_supervised=true", "model.labels=30", "loss.feature_matching=true",
                             "train.batch_size=32", "train.kimg=0.64", "train.checkpoint_every_kimg=0.64",
                             "train.fid_every_kimg=0.64"])
    dataset_dir = prepare(cfg.data, tmp_path / "data")
    x, y = read_split(dataset_dir, "train")
    x_test, y_test = read_split(dataset_dir, "test")
    evaluator_dir = save_evaluator(train_evaluator(x, y, x[:100], y[:100], epochs=1)[0], tmp_path / "evaluator")
    kept = tmp_path / "checkpoint"

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
    state = fit(cfg, model_batches(lambda e: shuffled(x, None, 32, seed=e), 1.0),
                spec=DataSpec.from_manifest(load_manifest(dataset_dir)), report=keep,
                labelled=LabelledPool.from_split(x, y, labels=30, seed=cfg.train.seed))
    scores = CheckpointScorer(cfg, dataset_dir, evaluator_dir)(kept)
    assert {"train/fid_2k", "train/sgan_accuracy_30_labels"} <= set(scores)
    with torch.no_grad():
        predicted = state.D.eval()(to_model_range(x_test))[:, :10].argmax(1)
    expected = (predicted == torch.from_numpy(y_test)).float().mean().item()
    assert scores["train/sgan_accuracy_30_labels"] == pytest.approx(expected)
    assert scores["train/sgan_accuracy_30_labels"] > 0.2, "20 steps with 30 labels already beat chance (0.1)"
