"""The evaluator and evaluate stages over a real SQLite MLflow store: trained once then reused, metrics with
sample counts and the real-vs-real floor, G_ema and G both scored, 2-D data scored by modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gan.config_loader import load_config
from gan.data import load_manifest, read_split, to_model_range
from gan.data.labelled import LabelledPool
from gan.loop import DataSpec, fit, save_state
from gan.metrics.evaluator import accuracy, load_evaluator
from pipelines import cli
from pipelines.registration import register_stage
from pipelines.stages import evaluate_stage, evaluator_stage, prepare_stage, score_model

pytestmark = pytest.mark.integration


def train_in_process(cfg, dataset_dir, out_dir):
    manifest = load_manifest(dataset_dir)
    x, y = read_split(manifest, "train")
    real = to_model_range(x, manifest.scale)
    labels = torch.from_numpy(y) if cfg.model.conditional else None
    pool = (LabelledPool.from_split(x, y, labels=cfg.model.labels, seed=cfg.train.seed, scale=manifest.scale)
            if cfg.model.semi_supervised else None)

    def batches(epoch):
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(epoch))
        b = cfg.train.batch_size
        for i in range(len(real) // b):
            idx = order[i * b:(i + 1) * b]
            yield real[idx], (None if labels is None else labels[idx])

    spec = DataSpec.from_manifest(manifest)
    state = fit(cfg, batches, spec=spec, report=lambda m, c: None, labelled=pool)
    return {"checkpoint_dir": str(save_state(state, out_dir, cfg, spec))}


def test_digits_evaluator_is_trained_once_and_scores_g_and_g_ema(stage_context, tmp_path):
    ctx = stage_context
    cfg = load_config(None, ["name=digits-eval", "data.source=digits",
                             "model.family=dcgan", "model.g_width=16", "model.d_width=16", "train.kimg=3",
                             "eval.num_samples=500", "eval.evaluator_epochs=6", "scale.num_workers=1"])
    dataset = prepare_stage(ctx, cfg)
    first = evaluator_stage(ctx, cfg, dataset)
    assert first["floor"]["evaluator/test_accuracy"] >= 0.95
    again = evaluator_stage(ctx, cfg, dataset)
    assert again["evaluator_id"] == first["evaluator_id"]
    assert ctx.tracker.run(again["run_id"]).data.tags["reused"] == "True"
    assert ctx.tracker.run(first["run_id"]).data.tags["reused"] == "False"

    trained = train_in_process(cfg, dataset["dataset_dir"], tmp_path / "ckpt")
    out = evaluate_stage(ctx, cfg, dataset, first, trained)
    m = out["metrics"]
    for key in ("fid_500", "is_500", "kid_500", "precision_500", "recall_500"):
        assert key in {k.removeprefix("eval/") for k in m} and f"eval_raw/{key}" in m, key
    assert m["eval/fid_floor_359"] < m["eval/fid_500"], "a 3-kimg generator is worse than real data"
    assert 1.0 <= m["eval/is_500"] <= 10.0
    run = ctx.tracker.run(out["run_id"])
    assert run.data.tags["evaluator_id"] == first["evaluator_id"] and run.data.tags["generator"] == "G_ema"
    assert ctx.tracker.artifact_paths(out["run_id"]) == ["samples.png"]
    # Deterministic: the same checkpoint, seed and evaluator give the same numbers.
    assert evaluate_stage(ctx, cfg, dataset, first, trained)["metrics"]["eval/fid_500"] == m["eval/fid_500"]


def test_ring8_is_scored_by_mode_metrics(stage_context, tmp_path):
    ctx = stage_context
    cfg = load_config(None, ["name=ring-eval", "data.source=ring8", "data.num_samples=2000",
                             "model.hidden=[32]", "train.kimg=2"])
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    assert evaluator["evaluator_dir"] is None
    out = evaluate_stage(ctx, cfg, dataset, evaluator, train_in_process(cfg, dataset["dataset_dir"], tmp_path / "c"))
    expected = {"eval/modes_covered", "eval/high_quality", "eval/reverse_kl", "eval/mode_gap", "eval_raw/modes_covered"}
    assert expected <= set(out["metrics"])
    assert 0 <= out["metrics"]["eval/modes_covered"] <= 8


def test_semi_supervised_d_is_scored_as_a_classifier_beside_a_plain_one(stage_context, tmp_path):
    ctx = stage_context
    cfg = load_config(None, ["name=digits-sgan", "data.source=digits",
                             "model.family=dcgan", "model.g_width=16", "model.d_width=16", "model.semi_supervised=true",
                             "model.labels=100", "train.kimg=20", "train.batch_size=64", "eval.num_samples=300",
                             "eval.evaluator_epochs=4", "scale.num_workers=1"])
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    trained = train_in_process(cfg, dataset["dataset_dir"], tmp_path / "ckpt")
    m = evaluate_stage(ctx, cfg, dataset, evaluator, trained)["metrics"]
    sgan, plain = m["eval/sgan_accuracy_100_labels"], m["eval/plain_accuracy_100_labels"]
    print(f"digits, 100 labels: SGAN D {sgan:.3f}, plain classifier {plain:.3f}")
    assert plain > 0.6, "a CNN on 100 labelled digits is far above chance"
    assert sgan > 0.6, "the K+1 D learned classes from 100 labels (chance is 0.1; measured 0.86)"


def test_a_conditional_generator_is_scored_by_class_agreement_and_samples_the_asked_class(stage_context, tmp_path):
    """Trained on digits in process (about 25 s here), evaluated, registered, then `sample --class K`."""
    ctx = stage_context
    cfg = load_config(None, ["name=digits-cond", "data.source=digits", "model.family=dcgan", "model.g_width=16",
                             "model.d_width=16", "model.d_convs_per_stage=2", "model.z_dim=64",
                             "model.conditional=true", "loss.r1_gamma=1", "optim.lr_g=5e-4", "optim.lr_d=5e-4",
                             "optim.beta1=0", "optim.beta2=0.99", "train.kimg=10", "eval.num_samples=500",
                             "eval.evaluator_epochs=6", "scale.num_workers=1"])
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    trained = train_in_process(cfg, dataset["dataset_dir"], tmp_path / "ckpt")
    evaluated = evaluate_stage(ctx, cfg, dataset, evaluator, trained)
    m = evaluated["metrics"]
    print(f"digits conditional, 10 kimg: class agreement {m['eval/class_agreement_500']:.3f} "
          f"(worst class {m['eval/class_agreement_worst_500']:.3f}), FID {m['eval/fid_500']:.1f}")
    assert m["eval/class_agreement_500"] >= 0.8, "10 kimg on digits draws the asked class (0.99 measured)"
    assert 0.0 <= m["eval_raw/class_agreement_500"] <= 1.0

    registered = register_stage(ctx, cfg, dataset, evaluator, trained, evaluated)
    rescored = score_model(ctx.tracker, cfg, dataset, evaluator, registered["champion_uri"])
    assert rescored["eval/class_agreement_500"] == pytest.approx(m["eval/class_agreement_500"], abs=0.01), \
        "the registered model scores like its checkpoint"
    net = load_evaluator(evaluator["evaluator_dir"])
    for k in (3, 8):
        png = tmp_path / f"class-{k}.png"
        assert cli.main(["sample", "--model", registered["champion_uri"], "--class", str(k), "-n", "50", "--npy",
                         "--out", str(png), "--tracking-uri", ctx.tracker.tracking_uri]) == 0
        images, labels = np.load(png.with_suffix(".npy")), np.load(png.with_suffix(".labels.npy"))
        assert images.shape == (50, 1, 28, 28) and (labels == k).all()
        agreement = accuracy(net, images, labels)
        print(f"sample --class {k}: {agreement:.2f} classified as {k}")
        assert agreement >= 0.8, f"sample --class {k} draws {k}s"
