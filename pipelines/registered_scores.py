"""Scoring a logged or registered model of any kind under this run's protocol, as the register stage re-scores a
champion scored otherwise: a generator like the evaluate stage (pipelines.stages.score_model), an autoencoder by its
reconstruction error and a classifier by its accuracy, both on the dataset's test split."""

from __future__ import annotations

from typing import Any

from torch import nn

from gan.autoencoding import reconstruction_metrics
from gan.config import Config
from gan.data import read_split
from gan.export import ModelRangeView, PixelRangeView
from gan.metrics.evaluator import accuracy
from pipelines.model_registry import AUTOENCODER, CLASSIFIER, GENERATOR, ModelKind
from pipelines.stages import score_model
from pipelines.tracking import Tracker

DECODER_URI = "decoder_uri"
"""The metadata key (and version tag) of a registered autoencoder's encoder that locates its decoder."""


def load_autoencoder(tracker: Tracker, model_uri: str) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """A registered autoencoder as served modules: the encoder (images in [0, 1] -> codes), the decoder logged beside
    it (codes -> images in [0, 1]), and the encoder's metadata."""
    encoder, _, metadata = tracker.load_model(model_uri)
    if DECODER_URI not in metadata:
        raise ValueError(f"{model_uri} is not an autoencoder's encoder: its metadata names no {DECODER_URI}")
    decoder, _, _ = tracker.load_model(metadata[DECODER_URI])
    return encoder, decoder, metadata


def score_registered(tracker: Tracker, cfg: Config, dataset: dict[str, Any], evaluator: dict[str, Any],
                     model_uri: str, kind: ModelKind, metric: str) -> dict[str, float]:
    """The metrics of the `kind` model at `model_uri` that hold `metric`, its score, under `cfg`'s eval settings."""
    if kind is GENERATOR:
        return score_model(tracker, cfg, dataset, evaluator, model_uri)
    x_test, y_test = read_split(dataset["dataset_dir"], "test", verify=False)
    if kind is AUTOENCODER:
        encoder, decoder, _ = load_autoencoder(tracker, model_uri)
        return reconstruction_metrics(PixelRangeView(encoder), ModelRangeView(decoder, points=False), x_test,
                                      batch_size=cfg.eval.batch_size)
    if kind is CLASSIFIER:
        classifier, _, _ = tracker.load_model(model_uri)
        return {metric: accuracy(PixelRangeView(classifier), x_test, y_test)}
    raise ValueError(f"no scorer for models of kind {kind.name}")
