"""Semi-supervised GAN: its K+1 discriminator as a classifier, beside a plain classifier on the same labels."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor, nn

from gan.data.reader import keep_labels
from gan.metrics.evaluator import accuracy, train_evaluator

BASELINE_STEPS = 600  # a few labels make short epochs: train the baseline for a fixed number of steps


class ClassLogits(nn.Module):
    """D's K class logits without the fake logit, so argmax is a class prediction."""

    def __init__(self, D: nn.Module):
        super().__init__()
        self.D = D

    def forward(self, x: Tensor) -> Tensor:
        return self.D(x)[:, :-1]


def semi_supervised_metrics(D: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                            y_test: np.ndarray, *, labels: int, seed: int) -> dict[str, float]:
    """Test accuracy of the K+1 D and of an evaluator-sized CNN trained on the same `labels` labelled examples
    (the subset `keep_labels(y_train, labels, seed)`, as in training)."""
    masked = keep_labels(y_train, labels, seed)
    keep = masked >= 0
    batch = min(64, int(keep.sum()))
    epochs = math.ceil(BASELINE_STEPS / max(1, int(keep.sum()) // batch))
    _, plain = train_evaluator(x_train[keep], masked[keep], x_test, y_test, epochs=epochs, batch_size=batch,
                               seed=seed)
    return {f"eval/sgan_accuracy_{labels}_labels": accuracy(ClassLogits(D), x_test, y_test),
            f"eval/plain_accuracy_{labels}_labels": plain}
