"""Registered model kinds over a real SQLite MLflow store, without Ray: a VAE competes with a GAN for the generators'
champion under the same evaluator, the autoencoder is registered as its own model (never a generator champion, even
under the generators' name), loads back from models:/ with its decoder and is re-scored on a new test split, and a
semi-supervised GAN's classifier registers under its own name, loads from models:/ and is re-scored alike."""

from __future__ import annotations

import pytest
import torch

from gan.autoencoding import reconstruction_metrics
from gan.config_loader import load_config
from gan.data import read_split
from gan.export import ModelRangeView, PixelRangeView
from gan.metrics.evaluator import accuracy
from pipelines.model_registry import CHAMPION, ShapeError, rescored_tag
from pipelines.registered_scores import load_autoencoder
from pipelines.registration import register_stage
from pipelines.stages import StageError, evaluate_stage, evaluator_stage, prepare_stage
from tests.integration.test_evaluation_stages import train_in_process

pytestmark = pytest.mark.integration

DIGITS = ["data.source=digits", "data.resolution=16", "train.batch_size=32", "eval.num_samples=300",
          "eval.evaluator_epochs=1"]
GAN = ["name=gan", "model.hidden=[32]", "model.z_dim=16", "train.kimg=0.5"]
VAE = ["name=vae", "model.family=vae", "model.z_dim=8", "model.encoder_hidden=[64]", "model.decoder_hidden=[64]",
       "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0.9", "train.kimg=3"]
AE = ["name=ae", "model.family=ae", "model.z_dim=16", "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0.9",
      "train.kimg=3"]


def _pipeline(ctx, tmp_path, *overrides):
    cfg = load_config(None, [*DIGITS, *overrides])
    dataset = prepare_stage(ctx, cfg)
    evaluator = evaluator_stage(ctx, cfg, dataset)
    trained = train_in_process(cfg, dataset["dataset_dir"], tmp_path / cfg.name / str(len(list(tmp_path.iterdir()))))
    evaluated = evaluate_stage(ctx, cfg, dataset, evaluator, trained)
    return dataset, evaluator, evaluated, register_stage(ctx, cfg, dataset, evaluator, trained, evaluated)


def test_the_vae_competes_with_the_gan_and_the_autoencoder_never_does(stage_context, tmp_path):
    ctx = stage_context
    _, gan_evaluator, gan_eval, gan = _pipeline(ctx, tmp_path, *GAN)
    _, vae_evaluator, vae_eval, vae = _pipeline(ctx, tmp_path, *VAE)
    assert gan["model_name"] == vae["model_name"] == "gan-digits-16px" and vae["version"] == "2"
    assert vae_evaluator["evaluator_id"] == gan_evaluator["evaluator_id"], "scored alike: one evaluator"
    fids = {"1": gan_eval["metrics"]["eval/fid_300"], "2": vae_eval["metrics"]["eval/fid_300"]}
    print(f"digits 16px, FID(300): GAN {fids['1']:.1f}, VAE {fids['2']:.1f}")
    assert ctx.tracker.alias_version("gan-digits-16px", CHAMPION) == min(fids, key=fids.get) == vae["champion_version"]
    assert "eval/reconstruction_error" in vae_eval["metrics"], "a VAE's reconstructions are reported beside its FID"

    dataset, _, ae_eval, ae = _pipeline(ctx, tmp_path, *AE)
    assert ae["model_name"] == "ae-digits-16px" and ae["is_champion"] and ae["version"] == "1"
    assert not any(k.startswith("eval/fid") for k in ae_eval["metrics"])
    assert ctx.tracker.alias_version("gan-digits-16px", CHAMPION) == vae["champion_version"], "untouched"
    tags = ctx.tracker.model_versions("ae-digits-16px")[0].tags
    assert tags["model_kind"] == "autoencoder" and tags["z_dim"] == "16"
    assert tags["score_metric"] == "eval/reconstruction_error" and tags["score_order"] == "lower"

    # Loaded from the registry, encoder and decoder reconstruct the test split with the registered error.
    encoder, decoder, metadata = load_autoencoder(ctx.tracker, f"models:/ae-digits-16px@{CHAMPION}")
    assert metadata["decoder_uri"] == tags["decoder_uri"]
    x_test, _ = read_split(dataset["dataset_dir"], "test")
    assert encoder(torch.rand(3, 1, 16, 16)).shape == (3, 16), "images in [0, 1] -> codes"
    assert decoder(torch.randn(3, 16)).shape == (3, 1, 16, 16), "codes -> images in [0, 1]"
    again = reconstruction_metrics(PixelRangeView(encoder), ModelRangeView(decoder, points=False), x_test)
    assert again["eval/reconstruction_error"] == pytest.approx(float(tags["score"]), rel=1e-5)

    # Under the generators' name it is refused before anything is logged.
    with pytest.raises(StageError, match="gan-digits-16px holds generator models, this one is an autoencoder") as err:
        _pipeline(ctx, tmp_path, *AE, "register.model_name=gan-digits-16px")
    assert isinstance(err.value.__cause__, ShapeError)
    assert len(ctx.tracker.model_versions("gan-digits-16px")) == 2


def test_an_autoencoder_champion_is_rescored_on_a_new_test_split(stage_context, tmp_path):
    ctx = stage_context
    first_dataset, _, _, first = _pipeline(ctx, tmp_path, *AE)
    second_dataset, second_evaluator, _, second = _pipeline(ctx, tmp_path, *AE, "data.seed=1", "train.seed=1")
    assert second_dataset["dataset_hash"] != first_dataset["dataset_hash"]
    tags = {str(v.version): v.tags for v in ctx.tracker.model_versions("ae-digits-16px")}
    rescored = float(tags["1"][rescored_tag(second_evaluator["evaluator_id"], "eval/reconstruction_error")])
    assert 0 < rescored < 0.2
    better = "2" if float(tags["2"]["score"]) < rescored else "1"
    assert ctx.tracker.alias_version("ae-digits-16px", CHAMPION) == better == second["champion_version"]
    assert "was re-scored under evaluator `test-split-" in second["decision"]


def test_the_semi_supervised_classifier_registers_under_its_own_name_and_loads(stage_context, tmp_path):
    ctx = stage_context
    dataset, _, evaluated, out = _pipeline(ctx, tmp_path, *GAN, "name=sgan", "model.semi_supervised=true",
                                           "model.labels=100", "train.kimg=3")
    assert out["model_name"] == "gan-digits-16px" and out["classifier_model_name"] == "classifier-digits-16px"
    assert out["classifier_is_champion"] and out["classifier_version"] == "1"
    assert "higher is better" in out["classifier_decision"]
    tags = ctx.tracker.model_versions("classifier-digits-16px")[0].tags
    assert tags["model_kind"] == "classifier" and tags["score_metric"] == "eval/sgan_accuracy_100_labels"
    classifier, shapes, metadata = ctx.tracker.load_model(f"models:/classifier-digits-16px@{CHAMPION}")
    assert shapes == [(-1, 1, 16, 16)] and int(metadata["num_classes"]) == 10
    x_test, y_test = read_split(dataset["dataset_dir"], "test")
    registered = accuracy(PixelRangeView(classifier), x_test, y_test)
    assert registered == pytest.approx(evaluated["metrics"]["eval/sgan_accuracy_100_labels"])
    assert registered > 0.2, "better than chance (0.1)"


def test_a_classifier_champion_is_rescored_on_a_new_test_split(stage_context, tmp_path):
    ctx = stage_context
    sgan = [*GAN, "name=sgan", "model.semi_supervised=true", "model.labels=100", "train.kimg=3"]
    first_dataset, _, _, first = _pipeline(ctx, tmp_path, *sgan)
    second_dataset, _, _, second = _pipeline(ctx, tmp_path, *sgan, "data.seed=1", "train.seed=1")
    assert second_dataset["dataset_hash"] != first_dataset["dataset_hash"]
    key = "eval/sgan_accuracy_100_labels"
    tags = {str(v.version): v.tags for v in ctx.tracker.model_versions("classifier-digits-16px")}
    rescored = float(tags["1"][rescored_tag(tags["2"]["evaluator_id"], key)])
    classifier, _, _ = ctx.tracker.load_model("models:/classifier-digits-16px/1")
    x_test, y_test = read_split(second_dataset["dataset_dir"], "test")
    assert rescored == pytest.approx(accuracy(PixelRangeView(classifier), x_test, y_test)), "on the new test split"
    better = "2" if float(tags["2"]["score"]) > rescored else "1"
    assert first["classifier_champion_version"] == "1"
    champion = ctx.tracker.alias_version("classifier-digits-16px", CHAMPION)
    assert champion == better == second["classifier_champion_version"]
    assert "was re-scored under evaluator `test-split-" in second["classifier_decision"]
