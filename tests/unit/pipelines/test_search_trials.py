"""Search trials without a cluster: which trials train in their Tune process, what they reserve, how many run at once,
a trial's config, when a checkpoint is scored and how (seeded, cached per process), the in-memory batch order, where a
trial's time went (TrialClock), MLflow retries, and Ray's own output kept out of a search's."""

import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch

import pipelines
from gan.config import ConfigError
from gan.config_loader import load_config
from gan.data import load_manifest, prepare, read_split
from gan.data.batches import shuffled
from gan.data.reader import Manifest
from gan.loop import DataSpec, fit
from gan.metrics import in_training, save_evaluator, train_evaluator
from gan.metrics.in_training import CheckpointScorer, ScoreSchedule
from pipelines import tune_trial
from pipelines.ray_train_worker import model_batches
from pipelines.ray_tune import max_concurrent_trials, trial_config, trial_resources
from pipelines.tracking import with_retries
from pipelines.tune_output import ray_output_wanted, search_output
from pipelines.tune_trial import PHASES, TrialClock, trains_in_trial

SEARCH = ["tune.space={optim.lr_g: {loguniform: [1e-4, 1e-3]}}", "tune.num_samples=8"]


def manifest(train_count: int, shape=(1, 28, 28)) -> Manifest:
    return Manifest(dataset_id="d", source="digits", kind="images", shape=shape, dtype="uint8", num_classes=10,
                    labels=tuple(range(10)), scale=1.0, dataset_hash="h", splits={"train": {"count": train_count}},
                    config={}, path="/nowhere")


def test_single_worker_trials_whose_split_fits_the_cache_train_in_their_trial():
    one = load_config(None, [*SEARCH, "data.cache_mb=1"])
    assert trains_in_trial(one, manifest(1000))  # 784 kB
    assert not trains_in_trial(one, manifest(2000)), "1.6 MB does not fit 1 MB: a TorchTrainer streams it"
    assert not trains_in_trial(load_config(None, [*SEARCH, "scale.num_workers=2"]), manifest(10))


def test_a_trial_that_trains_in_itself_reserves_a_workers_resources():
    cfg = load_config(None, [*SEARCH, "scale.cpus_per_worker=0.5", "scale.use_gpu=true",
                             "scale.worker_resources={trainer: 1}", "tune.cpus_per_trial=0.1"])
    assert trial_resources(cfg, in_trial=True) == {"CPU": 0.5, "GPU": 1.0, "trainer": 1}
    assert trial_resources(cfg, in_trial=False) == {"CPU": 0.1}


@pytest.mark.parametrize("overrides, in_trial, cpus, expected", [
    (["scale.cpus_per_worker=1"], True, 2, 2),  # no CPU kept for Ray Data: the trial reads no Parquet
    (["scale.cpus_per_worker=0.4"], True, 2, 5),
    (["scale.cpus_per_worker=0.4", "tune.num_samples=3"], True, 2, 3),
    (["scale.cpus_per_worker=0.4", "tune.cpus_per_trial=0.1"], False, 2, 2),
    (["scale.num_workers=2", "scale.cpus_per_worker=0.4", "tune.cpus_per_trial=0.1"], False, 2, 1),
])
def test_concurrent_trials_follow_what_each_trial_reserves(overrides, in_trial, cpus, expected):
    cfg = load_config(None, [*SEARCH, *overrides])
    assert max_concurrent_trials(cfg, {"CPU": cpus}, in_trial) == expected


def test_a_trial_that_cannot_fit_names_the_setting():
    cfg = load_config(None, [*SEARCH, "scale.cpus_per_worker=3"])
    with pytest.raises(ConfigError, match="scale.cpus_per_worker=3"):
        max_concurrent_trials(cfg, {"CPU": 2}, in_trial=True)
    gpu = load_config(None, [*SEARCH, "scale.use_gpu=true"])
    assert max_concurrent_trials(gpu, {"CPU": 16, "GPU": 3}, in_trial=True) == 3
    quarter = load_config(None, [*SEARCH, "scale.use_gpu=true", "scale.gpus_per_worker=0.25", "tune.num_samples=8"])
    assert max_concurrent_trials(quarter, {"CPU": 16, "GPU": 1}, in_trial=True) == 4  # four trials share one GPU
    assert trial_resources(quarter, in_trial=True)["GPU"] == 0.25
    with pytest.raises(ConfigError, match="scale.gpus_per_worker per worker"):
        max_concurrent_trials(load_config(None, [*SEARCH, "scale.use_gpu=true", "scale.gpus_per_worker=2"]),
                              {"CPU": 16, "GPU": 1}, in_trial=True)


def test_scores_fall_on_the_first_checkpoint_every_interval_and_the_last():
    schedule = ScoreSchedule(load_config(None, ["train.kimg=5", "train.checkpoint_every_kimg=1",
                                                "train.fid_every_kimg=2"]))
    assert [i for i in (1024, 2048, 3072, 4096, 5120) if schedule.due(i)] == [1024, 2048, 4096, 5120]


def test_in_memory_epochs_are_seeded_full_batches_of_matching_rows():
    x, y = np.arange(10 * 3).reshape(10, 3), np.arange(10)
    first = list(shuffled(x, y, 4, seed=7))
    assert len(first) == 2 and all(len(b) == 4 for b, _ in first), "the remainder is dropped"
    assert all((bx[:, 0] // 3 == by).all() for bx, by in first), "x and y rows stay together"
    assert [b.tolist() for b, _ in first] == [b.tolist() for b, _ in shuffled(x, y, 4, seed=7)]
    assert [b.tolist() for b, _ in first] != [b.tolist() for b, _ in shuffled(x, y, 4, seed=8)]
    assert all(by is None for _, by in shuffled(x, None, 4, seed=7))


class FakeTime:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_trials_phases_add_up_to_its_lifetime(monkeypatch):
    clock_time = FakeTime(100.0)
    monkeypatch.setattr(tune_trial.time, "time", clock_time)
    clock = TrialClock(started=100.0)
    clock_time.now = 110.0  # first report: 3 s of steps and a 1 s checkpoint before it, so the first step was at 106
    clock.report_arrived({"time/steps_s": 3.0, "time/checkpoint_s": 1.0})
    clock_time.now = 112.0
    clock.report_done({"time/steps_s": 3.0, "time/checkpoint_s": 1.0, "time/score_s": 1.5})
    clock_time.now = 115.0
    got = clock.summary()
    assert got == {"trial_time/total_s": 15.0, "trial_time/startup_s": 6.0, "trial_time/train_s": 3.0,
                   "trial_time/checkpoint_s": 1.0, "trial_time/score_s": 1.5, "trial_time/report_s": 0.5,
                   "trial_time/teardown_s": 3.0}
    assert sum(got[f"trial_time/{p}_s"] for p in PHASES) == pytest.approx(got["trial_time/total_s"])


def test_a_trial_that_never_reported_spent_its_life_starting(monkeypatch):
    clock_time = FakeTime(50.0)
    monkeypatch.setattr(tune_trial.time, "time", clock_time)
    clock = TrialClock(started=42.0)
    got = clock.summary()
    assert got["trial_time/total_s"] == got["trial_time/startup_s"] == 8.0
    assert all(got[f"trial_time/{p}_s"] == 0 for p in PHASES if p != "startup")


def test_a_processs_first_trial_starts_when_the_process_loaded_the_package(monkeypatch):
    monkeypatch.setattr(tune_trial, "_trials_in_process", 0)
    assert tune_trial.trial_start() == pipelines.LOADED_AT
    assert tune_trial.trial_start() > pipelines.LOADED_AT



def test_ray_output_is_off_during_a_search_unless_asked_for(monkeypatch):
    monkeypatch.delenv("RAYGAN_RAY_OUTPUT", raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with search_output():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0", "the engine that prints at verbose=0 is off"
        assert logging.getLogger("ray.tune").getEffectiveLevel() == logging.WARNING
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1", "the caller's environment comes back"
    assert "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S" not in os.environ
    monkeypatch.setenv("RAYGAN_RAY_OUTPUT", "1")
    assert ray_output_wanted()
    with search_output():
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_a_trial_config_takes_the_sampled_values_that_apply_to_it():
    space = ("tune.space={optim.lr_g: {loguniform: [1e-4, 1e-3]}, model.family: {choice: [mlp, dcgan]},"
             " model.g_width: {choice: [8, 16], when: {model.family: dcgan}}}")
    cfg = load_config(None, ["name=s", "data.source=digits", "data.resolution=28", space])
    dcgan = trial_config(cfg, {"optim.lr_g": 3e-4, "model.family": "dcgan", "model.g_width": 8}, "s-1")
    assert (dcgan.optim.lr_g, dcgan.model.family, dcgan.model.g_width, dcgan.name) == (3e-4, "dcgan", 8, "s-1")
    assert not dcgan.tune.enabled, "a trial's config is a plain training config"
    mlp = trial_config(cfg, {"optim.lr_g": 2e-4, "model.family": "mlp", "model.g_width": 8})
    assert mlp.model.family == "mlp" and mlp.model.g_width == cfg.model.g_width, "`when` did not hold: base value"
    assert mlp.name == "s"


def test_mlflow_calls_are_retried_on_a_locked_database_only():
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"
    assert with_retries(locked_twice, base_delay=0.001) == "ok" and len(calls) == 3
    calls.clear()

    def broken():
        calls.append(1)
        raise ValueError("no such run")
    with pytest.raises(ValueError, match="no such run"):
        with_retries(broken, base_delay=0.001)
    assert len(calls) == 1, "an error that would happen again is not retried"
    calls.clear()
    with pytest.raises(RuntimeError, match="locked"):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(RuntimeError("database is locked")),
                     attempts=3, base_delay=0.001)
    assert len(calls) == 3, "it gives up after `attempts`"


def test_the_checkpoint_scorer_is_seeded_cached_per_process_and_inf_for_a_broken_generator(tmp_path):
    cfg = load_config(None, ["data.source=digits", "data.resolution=16", "model.hidden=[16]", "model.z_dim=8",
                             "train.batch_size=64", "train.kimg=0.2", "train.checkpoint_every_kimg=0.2",
                             "train.fid_every_kimg=0.2"])
    dataset_dir = prepare(cfg.data, tmp_path / "data")
    x, y = read_split(dataset_dir, "train")
    net, _ = train_evaluator(x, y, x[:200], y[:200], epochs=1)
    evaluator_dir = save_evaluator(net, tmp_path / "evaluator")
    kept = tmp_path / "checkpoint"

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
    batches = model_batches(lambda e: shuffled(x, y, 64, seed=e), 1.0)
    fit(cfg, batches, spec=DataSpec.from_manifest(load_manifest(dataset_dir)), report=keep)

    before = in_training._real_side.cache_info().hits
    first = CheckpointScorer(cfg, dataset_dir, evaluator_dir)(kept)
    again = CheckpointScorer(cfg, dataset_dir, evaluator_dir)(kept)
    assert set(first) == {"train/fid_2k", "train/recall_2k", "train/top_class_share"}
    assert 0 < first["train/fid_2k"] < 1e4 and 0 <= first["train/recall_2k"] <= 1
    assert 0.1 <= first["train/top_class_share"] <= 1  # of 10 classes
    assert again == first, "the same checkpoint scores the same: seeded latents, the same real side"
    assert in_training._real_side.cache_info().hits > before, "the second scorer reused the real features"

    state = torch.load(kept / "state.pt", weights_only=True)
    for name in [k for k in state["modules"]["G_ema"] if k.endswith("weight")]:
        state["modules"]["G_ema"][name] = torch.full_like(state["modules"]["G_ema"][name], float("nan"))
    torch.save(state, kept / "state.pt")
    assert CheckpointScorer(cfg, dataset_dir, evaluator_dir)(kept) == {"train/fid_2k": math.inf}
