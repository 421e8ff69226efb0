"""Evaluation: the evaluator net, FID/IS/KID (torchmetrics), precision/recall, Inception-v3, 2-D mode metrics."""

from gan.metrics.evaluator import (
    Evaluator,
    evaluator_id,
    evaluator_meta,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)
from gan.metrics.image_metrics import (
    SampleFn,
    count_tag,
    evaluate_images,
    extract,
    feature_metrics,
    fid_from_features,
    is_from_logits,
    kid_from_features,
    latent_sampler,
    precision_recall,
    real_features,
    real_floor,
)
from gan.metrics.inception import InceptionFeatures, check_inception_weights, load_inception
from gan.metrics.modes import ModeStats, mode_stats

__all__ = [
    "Evaluator", "InceptionFeatures", "ModeStats", "SampleFn",
    "check_inception_weights", "count_tag", "evaluate_images", "evaluator_id", "evaluator_meta", "extract",
    "feature_metrics", "fid_from_features", "is_from_logits", "kid_from_features", "latent_sampler",
    "load_evaluator", "load_inception", "mode_stats", "precision_recall", "real_features", "real_floor",
    "save_evaluator", "train_evaluator",
]
