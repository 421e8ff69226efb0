"""Ray Tune searches, for real on 2 CPUs: in-training FID and best checkpoints, ASHA with one nested MLflow run per
trial, a diverging trial, PBT exploiting a checkpoint, and an interrupted search resumed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from gan.checkpoint import read_checkpoint
from gan.config_loader import load_config
from pipelines import ray_train, ray_train_worker, ray_tune
from pipelines.stages import Context, evaluator_stage, prepare_stage
from pipelines.tracking import Tracker
from pipelines.tune_trial import PHASES
from tests.faults import DIVERGING_LR, interrupt_after_finished_trials

pytestmark = pytest.mark.integration

FID = "train/fid_2k"


def digits_cfg(tmp_path: Path, *extra: str):
    """16 px digits, a tiny MLP, one 0.4-CPU worker: a trial costs 0.5 CPU with its trainable."""
    return load_config(None, [
        "name=digits-search", "data.source=digits", "data.resolution=16",
        "model.hidden=[32]", "model.z_dim=16", "train.batch_size=32", "train.log_every_kimg=0.5",
        "train.checkpoint_every_kimg=0.5", "train.fid_every_kimg=0.5", "eval.num_samples=300",
        "eval.evaluator_epochs=2", "scale.num_workers=1", "scale.cpus_per_worker=0.4", "tune.cpus_per_trial=0.1",
        *extra])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The prepared digits and their evaluator, shared by the module's tests (they only read them)."""
    root = tmp_path_factory.mktemp("digits")
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    ctx = Context(workdir=root, tracker=tracker, experiment="tests", parent_run_id=tracker.start_run("tests", "prep"))
    cfg = digits_cfg(root)
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    return dataset["dataset_dir"], evaluator["evaluator_dir"]


def test_in_training_fid_picks_the_best_checkpoint_not_the_last(ray_session, stage_context, tmp_path, digits):
    ctx = stage_context
    dataset_dir, evaluator_dir = digits
    # 2 DDP workers: rank 0 scores alone while torch.distributed is up (torchmetrics must not sync).
    cfg = digits_cfg(tmp_path, "name=digits-fid", "train.kimg=1.5", "optim.lr_g=0.003", "optim.lr_d=0.003",
                     "scale.num_workers=2")
    run_id = ctx.tracker.start_run("tests", "train")
    out = ray_train.train(cfg, dataset_dir, storage_path=tmp_path / "ray", evaluator_dir=evaluator_dir,
                          tracking=ray_train_worker.Tracking(ctx.tracker.tracking_uri, run_id))
    history = {m.step: m.value for m in ctx.tracker.metric_history(run_id, FID)}
    assert sorted(history) == [512, 1024, 1504], "scored at every 0.5 kimg checkpoint and at the end"
    best_step = min(history, key=history.get)
    assert out.best_metric == pytest.approx(history[best_step]) and out.metrics[FID] == out.best_metric
    assert read_checkpoint(out.checkpoint_dir)["counters"]["images"] == best_step
    assert 0 < out.best_metric < 1e4


def test_checkpoints_between_scores_never_rank_best(ray_session, stage_context, tmp_path, digits):
    """fid_every_kimg = 2 x checkpoint_every_kimg, one checkpoint kept: the unscored ones must not evict the best."""
    ctx = stage_context
    dataset_dir, evaluator_dir = digits
    cfg = digits_cfg(tmp_path, "name=digits-unscored", "train.kimg=2", "train.fid_every_kimg=1",
                     "train.keep_checkpoints=1")
    run_id = ctx.tracker.start_run("tests", "train")
    out = ray_train.train(cfg, dataset_dir, storage_path=tmp_path / "ray", evaluator_dir=evaluator_dir,
                          tracking=ray_train_worker.Tracking(ctx.tracker.tracking_uri, run_id))
    history = {m.step: m.value for m in ctx.tracker.metric_history(run_id, FID)}
    steps = sorted(history)
    assert steps[:2] == [512, 1024] and len(steps) == 3 and steps[2] >= 2000, "scored at the first checkpoint, " \
        f"every 1 kimg and at the end: {steps}"
    assert out.best_metric == pytest.approx(min(history.values()))
    assert read_checkpoint(out.checkpoint_dir)["counters"]["images"] == min(history, key=history.get)
    assert not ctx.tracker.metric_history(run_id, "train/unscored"), "the placeholder is Ray's, not MLflow's"


def live_placement_groups(wait_s: float = 20.0) -> list[dict]:
    """Placement groups not yet REMOVED, polled for up to `wait_s`: Tune frees its trials' groups asynchronously."""
    deadline = time.monotonic() + wait_s
    while True:
        live = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def child_runs(ctx, parent_run_id: str) -> list:
    exp = ctx.tracker.experiment_id("tests")
    return ctx.tracker.client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_asha_search_stops_weak_trials_and_survives_a_diverging_one(ray_session, stage_context, tmp_path, digits,
                                                                    capfd):
    """Single-worker trials: each trains inside its Tune trial process, two at a time."""
    ctx = stage_context
    dataset_dir, evaluator_dir = digits
    # One of D's learning rates overflows its weights within a few steps: trials drawing it really diverge (G's
    # output ends in tanh, so a huge lr_g alone saturates rather than diverges).
    cfg = digits_cfg(tmp_path, "train.kimg=2", "tune.num_samples=4", "tune.grace_kimg=0.5",
                     "tune.max_concurrent_trials=2",
                     "tune.reduction_factor=2", "tune.seed=3",
                     f"tune.space={{optim.lr_d: {{choice: [3.0e-4, 1.0e-3, 3.0e-3, {DIVERGING_LR}]}},"
                     " optim.lr_g: {loguniform: [1e-4, 1e-2]}, model.hidden: {choice: [[16], [32]]}}")
    stage = ctx.tracker.start_run("tests", "train")
    out = ray_tune.tune(cfg, dataset_dir, evaluator_dir=evaluator_dir, storage_path=tmp_path / "ray",
                        tracking=ray_train_worker.Tracking(ctx.tracker.tracking_uri, stage))
    trials = {t["trial_id"]: t for t in out.trials}
    assert len(trials) == 4
    statuses = sorted(t["status"] for t in trials.values())
    diverging = {i for i, t in trials.items() if t["space"]["optim.lr_d"] == DIVERGING_LR}
    assert diverging and diverging == {i for i, t in trials.items() if t["status"] == "diverged"}, out.trials
    assert "stopped_early" in statuses, f"ASHA stopped no trial: {out.trials}"
    spent = sum(t["kimg"] for t in trials.values())
    assert spent < 4 * 2.0

    runs = {r.data.tags["trial_id"]: r for r in child_runs(ctx, stage)}
    assert set(runs) == set(trials), "one nested MLflow run per trial"
    for trial_id, run in runs.items():
        assert run.data.tags["tune.status"] == trials[trial_id]["status"]
        assert run.data.params["optim.lr_g"] == str(trials[trial_id]["space"]["optim.lr_g"])
        if trials[trial_id]["status"] == "diverged":
            assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
            assert "NonFiniteLossError" in run.data.tags["error"]
        else:
            assert run.info.status == "FINISHED"
            # Rank 0 logs a score to MLflow before reporting it, so a trial ASHA stops at that moment has one more
            # score in MLflow than Tune saw: Tune's best is one of the logged scores, not always their minimum.
            fids = [m.value for m in ctx.tracker.metric_history(run.info.run_id, FID)]
            assert any(v == pytest.approx(trials[trial_id]["best_metric"]) for v in fids), (fids, trials[trial_id])
            assert trials[trial_id]["best_metric"] >= min(fids) - 1e-9
            assert ctx.tracker.artifact_paths(run.info.run_id, "samples")

    finished = [t for t in trials.values() if t["status"] != "diverged"]
    best = min(finished, key=lambda t: t["best_metric"])
    assert out.trial_run_id == best["run_id"] and out.metrics[FID] == pytest.approx(best["best_metric"])
    assert read_checkpoint(out.checkpoint_dir)["extra"]["config"]["optim"]["lr_g"] == best["space"]["optim.lr_g"]
    assert out.config.optim.lr_g == best["space"]["optim.lr_g"] and not out.config.tune.enabled
    assert out.config.name == cfg.name
    assert ctx.tracker.run(stage).data.tags["best_trial_run_id"] == best["run_id"]
    # ASHA killed trials' processes mid-run: their Train workers' CPUs must not stay reserved.
    assert live_placement_groups() == []

    for t in trials.values():  # where each trial's time went: phases that add up to its lifetime
        seconds = t["seconds"]
        assert seconds["total"] > 0 and seconds["startup"] > 0, t
        assert sum(seconds[p] for p in PHASES) == pytest.approx(seconds["total"], rel=1e-6), t
        if t["status"] != "diverged":
            assert seconds["train"] > 0 and seconds["score"] > 0, t
    printed = capfd.readouterr().out
    assert "Trial status:" not in printed and "Checkpoint successfully created" not in printed, "Tune's noise"
    for trial_id, t in trials.items():
        assert f"[search] trial {trial_id} started: optim.lr_d=" in printed
        ended = {"diverged": "failed: ", "stopped_early": "stopped by ASHA at ", "finished": "finished at "}
        assert f"[search] trial {trial_id} {ended[t['status']]}" in printed, printed


def test_pbt_exploits_a_better_trials_checkpoint_and_logs_new_learning_rates(ray_session, stage_context, tmp_path,
                                                                               digits):
    ctx = stage_context
    dataset_dir, evaluator_dir = digits
    cfg = digits_cfg(tmp_path, "name=digits-pbt", "train.kimg=1.5", "tune.scheduler=pbt", "tune.num_samples=2",
                     "tune.perturbation_interval_kimg=1", "tune.quantile_fraction=0.5", "tune.seed=1",
                     "tune.pbt_synchronous=true",
                     "tune.space={optim.lr_g: {loguniform: [1e-4, 1e-2]}, optim.lr_d: {loguniform: [1e-4, 1e-2]}}")
    stage = ctx.tracker.start_run("tests", "train")
    out = ray_tune.tune(cfg, dataset_dir, evaluator_dir=evaluator_dir, storage_path=tmp_path / "ray",
                        tracking=ray_train_worker.Tracking(ctx.tracker.tracking_uri, stage))
    runs = {r.data.tags["trial_id"]: r for r in child_runs(ctx, stage)}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    exploited = {t: r for t, r in runs.items() if "pbt.exploited_from" in r.data.tags}
    assert exploited, "no trial was restored from another's checkpoint"
    for trial_id, run in exploited.items():
        assert run.data.tags["pbt.exploited_from"] in set(runs) - {trial_id}
        lrs = ctx.tracker.metric_history(run.info.run_id, "hp/optim.lr_g")
        assert len(lrs) >= 2, "the restarted trial logs its (mutated) learning rate as a metric, not a param"
        # The restored run continues from the donor's images, so its kimg history goes on past the restore.
        steps = [m.step for m in ctx.tracker.metric_history(run.info.run_id, "progress/kimg")]
        assert max(steps) >= cfg.train.kimg * 1000
    assert out.metrics[FID] == min(t["best_metric"] for t in out.trials)


def test_an_interrupted_search_resumes_without_duplicating_finished_trials(ray_session, stage_context, tmp_path,
                                                                           digits):
    """2-worker trials: each runs a TorchTrainer, whose workers must be freed when the search is interrupted."""
    ctx = stage_context
    dataset_dir, evaluator_dir = digits
    cfg = digits_cfg(tmp_path, "name=digits-resume", "train.kimg=1", "tune.scheduler=fifo", "tune.num_samples=3",
                     "scale.num_workers=2", "tune.space={optim.lr_g: {loguniform: [1e-4, 1e-2]}}")
    stage = ctx.tracker.start_run("tests", "train")
    tracking = ray_train_worker.Tracking(ctx.tracker.tracking_uri, stage)
    interrupt = interrupt_after_finished_trials(ctx.tracker, "tests", stage, count=1)
    try:
        with pytest.raises(ray_tune.SearchInterrupted, match="run it again"):
            ray_tune.tune(cfg, dataset_dir, evaluator_dir=evaluator_dir, storage_path=tmp_path / "ray",
                          tracking=tracking)
    finally:
        interrupt.stop()
    assert interrupt.done.is_set() and interrupt.error is None, interrupt.error
    assert live_placement_groups() == [], "the interrupted trials' workers kept their CPUs"
    before = {r.data.tags["trial_id"]: r for r in child_runs(ctx, stage)}
    done_before = {t for t, r in before.items() if r.info.status == "FINISHED"}
    assert done_before and len(done_before) < 3

    out = ray_tune.tune(cfg, dataset_dir, evaluator_dir=evaluator_dir, storage_path=tmp_path / "ray", tracking=tracking)
    after = child_runs(ctx, stage)
    assert len(after) == 3 and {r.data.tags["trial_id"] for r in after} == {t["trial_id"] for t in out.trials}
    for trial_id in done_before:
        steps = [m.step for m in ctx.tracker.metric_history(before[trial_id].info.run_id, "progress/kimg")]
        assert steps == sorted(set(steps)), "a finished trial was not trained again"
    assert all(t["status"] == "finished" for t in out.trials)
