"""Ray Train, for real: 2 CPU workers on gloo over real MNIST, checkpoints, recovery, MLflow tracking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gan.checkpoint import read_checkpoint
from gan.config_loader import load_config
from pipelines.stages import StageError, evaluator_stage, prepare_stage, train_stage
from tests.faults import DIVERGING_LR, kill_a_train_worker_after

pytestmark = pytest.mark.integration


def mnist_cfg(root: Path, tmp_path: Path, *extra: str):
    return load_config(None, [
        "name=mnist-it", "data.source=idx", f"data.root={root}",
        "model.family=dcgan", "model.g_width=16", "model.d_width=16", "model.z_dim=32",
        "train.batch_size=64", "train.log_every_kimg=0.5", "train.checkpoint_every_kimg=1",
        "scale.num_workers=2", "scale.cpus_per_worker=0.5", *extra])


def kimg_steps(ctx, run_id: str) -> list[int]:
    return [m.step for m in ctx.tracker.metric_history(run_id, "progress/kimg")]


def test_two_workers_train_checkpoint_track_and_resume_on_rerun(ray_session, mnist_idx, tmp_path, stage_context):
    ctx = stage_context
    cfg = mnist_cfg(mnist_idx, tmp_path, "train.kimg=2")
    dataset = prepare_stage(ctx, cfg)
    out = train_stage(ctx, cfg, dataset)

    ckpt = Path(out["checkpoint_dir"])
    assert {p.name for p in ckpt.iterdir()} >= {"state.pt", "meta.json", "samples.png"}
    state = read_checkpoint(ckpt)
    assert state["counters"]["images"] >= 2000
    assert state["extra"]["config"]["scale"]["num_workers"] == 2
    assert set(state["modules"]) == {"G", "D", "G_ema"}

    run = ctx.tracker.run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr_g"] == "0.0002" and run.data.params["scale.num_workers"] == "2"
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0, "rank 0 runs MLflow's system monitor"
    steps = kimg_steps(ctx, out["run_id"])
    assert steps == sorted(steps) and len(steps) == 4 and steps[-1] >= 2000
    for key in ("loss/d", "loss/g", "d/real", "d/fake", "grad_norm/d", "grad_norm/g", "perf/img_per_s"):
        history = ctx.tracker.metric_history(out["run_id"], key)
        assert len(history) == 4 and all(torch.isfinite(torch.tensor(m.value)) for m in history), key
    assert sorted(ctx.tracker.artifact_paths(out["run_id"])) == ["loss_curves.png", "samples"]
    assert len(ctx.tracker.artifact_paths(out["run_id"], "samples")) == 2

    # The driver runs again under the same run name: training continues from the 2 kimg checkpoint.
    longer = mnist_cfg(mnist_idx, tmp_path, "train.kimg=3")
    again = train_stage(ctx, longer, dataset)
    resumed_steps = kimg_steps(ctx, again["run_id"])
    assert min(resumed_steps) > steps[-1], resumed_steps
    assert read_checkpoint(again["checkpoint_dir"])["counters"]["images"] >= 3000


def test_worker_failure_resumes_from_the_last_checkpoint(ray_session, mnist_idx, tmp_path, stage_context):
    """A Train worker process killed from outside (SIGKILL) at 3.5 kimg: the group restarts from a checkpoint."""
    ctx = stage_context
    cfg = mnist_cfg(mnist_idx, tmp_path, "name=mnist-fail", "train.kimg=6")
    dataset = prepare_stage(ctx, cfg)
    killer = kill_a_train_worker_after(ctx.tracker, ctx.experiment, kimg=3.5)
    out = train_stage(ctx, cfg, dataset, max_failures=1)
    assert killer.error is None and killer.done.is_set(), f"no worker was killed: {killer.error}"
    steps = kimg_steps(ctx, out["run_id"])
    assert len(steps) > len(set(steps)), f"no report repeated: the kill came too late to matter: {steps}"
    assert steps.count(512) == 1, f"training restarted from zero instead of the checkpoint: {steps}"
    assert max(steps) >= 6000
    assert read_checkpoint(out["checkpoint_dir"])["counters"]["images"] >= 6000
    assert ctx.tracker.run(out["run_id"]).info.status == "FINISHED"


def test_non_finite_losses_fail_the_run_with_a_clear_error(ray_session, mnist_idx, tmp_path, stage_context):
    ctx = stage_context
    # A learning rate this large overflows the weights within a few steps: a run that really diverges.
    cfg = mnist_cfg(mnist_idx, tmp_path, "name=mnist-nan", "train.kimg=2", "train.nonfinite_patience=3",
                    f"optim.lr_g={DIVERGING_LR}", f"optim.lr_d={DIVERGING_LR}")
    dataset = prepare_stage(ctx, cfg)
    with pytest.raises(StageError, match="nonfinite_patience=3"):
        train_stage(ctx, cfg, dataset, max_failures=1)
    runs = ctx.tracker.client.search_runs([ctx.tracker.experiment_id("tests")],
                                          filter_string="tags.stage = 'train'")
    assert [r.info.status for r in runs] == ["FAILED"]
    # The workers' own error, raised by the driver: not a WorkerGroupError of a second attempt FailureConfig made.
    assert runs[0].data.tags["error"].startswith("NonFiniteLossError: non-finite loss or gradient in 3 steps")


def test_a_collapse_alarm_configured_to_stop_ends_every_worker_at_the_best_checkpoint(ray_session, mnist_idx,
                                                                                      tmp_path, stage_context):
    ctx = stage_context
    # Every generator's most frequent class holds at least a tenth of its samples: the alarm fires at the first score.
    cfg = mnist_cfg(mnist_idx, tmp_path, "name=mnist-collapse", "train.kimg=4", "train.fid_every_kimg=1",
                    "train.collapse_class_share=0.05", "train.stop_on_collapse=true")
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, load_config(None, ["data.source=idx", f"data.root={mnist_idx}",
                                                        "eval.evaluator_epochs=1"]), dataset)
    out = train_stage(ctx, cfg, dataset, evaluator)
    assert read_checkpoint(out["checkpoint_dir"])["counters"]["images"] < 2000
    tags = ctx.tracker.run(out["run_id"]).data.tags
    assert tags["collapse"].startswith("at 1.02 kimg: one class takes") and tags["ended_early"].startswith("at 1.02")
    assert max(kimg_steps(ctx, out["run_id"])) < 2000


@pytest.mark.parametrize("extra", [
    ["model.conditional=true", "loss.kind=wgan-gp", "loss.n_critic=2", "optim.beta1=0.0", "loss.r1_gamma=1"],
    ["model.semi_supervised=true", "model.labels=50", "model.augment_labelled=true", "loss.kind=hinge",
     "model.spectral_norm=true", "loss.feature_matching=true"],
], ids=["conditional-wgan-gp-r1", "semi-supervised-hinge-sn-fm"])
def test_ddp_runs_every_head_and_penalty_without_unused_parameters(ray_session, tmp_path, stage_context, extra):
    """Two DDP workers (no find_unused_parameters) through gradient penalties, projection and K+1 heads (with the
    labelled pool's batch every D step and G's feature matching, both through DDP's forward)."""
    ctx = stage_context
    cfg = load_config(None, ["name=digits-ddp", "data.source=digits",
                             "model.family=dcgan", "model.g_width=8", "model.d_width=8", "train.batch_size=32",
                             "train.kimg=0.6", "train.log_every_kimg=0.3", "train.checkpoint_every_kimg=0.6",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.5", *extra])
    out = train_stage(ctx, cfg, prepare_stage(ctx, cfg))
    assert read_checkpoint(out["checkpoint_dir"])["counters"]["images"] >= 600
    assert all(torch.isfinite(torch.tensor(m.value))
               for m in ctx.tracker.metric_history(out["run_id"], "loss/d"))
    if "model.semi_supervised=true" in extra:  # each worker drew labelled batches from its pool
        supervised = ctx.tracker.metric_history(out["run_id"], "loss/d_supervised")
        assert supervised and all(0 < m.value < 10 for m in supervised)
