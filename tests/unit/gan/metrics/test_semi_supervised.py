"""The K+1 discriminator read as a classifier: the fake logit never wins the argmax."""

import numpy as np
import pytest
import torch
from torch import nn

from gan.metrics.evaluator import accuracy
from gan.metrics.semi_supervised import ClassLogits


class FixedD(nn.Module):
    """Class logits that point at the true label, and a fake logit larger than all of them."""

    def __init__(self, labels: torch.Tensor, k: int):
        super().__init__()
        self.labels, self.k = labels, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k + 1)
        out[torch.arange(len(x)), self.labels[: len(x)]] = 5.0
        out[:, -1] = 50.0
        return out


def test_class_logits_drop_the_fake_logit():
    y = torch.tensor([0, 3, 2, 1, 3, 0])
    x = np.zeros((6, 1, 8, 8), np.uint8)
    D = FixedD(y, k=4)
    assert accuracy(D, x, y) == 0.0, "the raw K+1 argmax picks 'fake' for every row"
    assert accuracy(ClassLogits(D), x, y) == 1.0
    wrong = y.roll(1)
    assert accuracy(ClassLogits(D), x, wrong) == pytest.approx(1 / 6)  # only row 0 keeps its label
