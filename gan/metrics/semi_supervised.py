"""Semi-supervised GAN: its K+1 discriminator as a classifier, beside a plain classifier on the same labels."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor, nn

from gan.data.labelled import labelled_subset
from gan.metrics.evaluator import accuracy, train_evaluator

BASELINE_STEPS = 600  # a few labels make short epochs: train the baseline for a fixed number of steps


class ClassLogits(nn.Module):
    """D's K class logits without the fake logit, so argmax is a class prediction."""

    def __init__(self, D: nn.Module):
        super().__init__()
        self.D = D

    def forward(self, x: Tensor) -> Tensor:
        return self.D(x)[:, :-1]


def sgan_accuracy_key(labels: int, prefix: str = "eval/") -> str:
    """The metric of the K+1 D's test accuracy when trained with `labels` labels (eval/ after training, train/
    during it)."""
    return f"{prefix}sgan_accuracy_{labels}_labels"


def sgan_accuracy(D: nn.Module, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of a K+1 D as a classifier (argmax over its K class logits, in eval mode) on uint8 images."""
    return accuracy(ClassLogits(D), x_test, y_test)


def plain_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                   labels: int, seed: int) -> float:
    """Test accuracy of an evaluator-sized CNN (with the evaluator's augmentation) trained for BASELINE_STEPS on
    the `labels` labelled examples `labelled_subset(x_train, y_train, labels, seed)`, the rows a semi-supervised
    run with train.seed = `seed` learns from."""
    x_kept, y_kept = labelled_subset(x_train, y_train, labels, seed)
    batch = min(64, len(y_kept))
    epochs = math.ceil(BASELINE_STEPS / max(1, len(y_kept) // batch))
    _, plain = train_evaluator(x_kept, y_kept, x_test, y_test, epochs=epochs, batch_size=batch, seed=seed)
    return plain


def semi_supervised_metrics(D: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                            y_test: np.ndarray, *, labels: int, seed: int) -> dict[str, float]:
    """Test accuracy of the K+1 D and of an evaluator-sized CNN trained on the same `labels` labelled examples
    (the subset `keep_labels(y_train, labels, seed)`, as in training)."""
    return {sgan_accuracy_key(labels): sgan_accuracy(D, x_test, y_test),
            f"eval/plain_accuracy_{labels}_labels": plain_accuracy(x_train, y_train, x_test, y_test, labels=labels,
                                                                   seed=seed)}
