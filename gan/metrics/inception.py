"""Inception-v3 pool features and logits from a local weights file (never downloaded), for literature-style FID/IS."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception_v3

KEY = "eval.inception_weights"
SIZE = 299
# Inception3's layers from the input to the 2048-d average pool, in the order its own forward runs them.
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


def check_inception_weights(path: str | Path) -> Path:
    """The weights file as a Path; raises naming eval.inception_weights when it is unset or missing. Call it
    before any other work, so an offline run fails in a second rather than after training."""
    if not str(path):
        raise ValueError(f"{KEY} is empty: give a local Inception-v3 state_dict file (weights are never downloaded)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{KEY}={str(path)!r} does not exist; Inception-v3 weights are never downloaded, "
                                "so the file must be present on this machine")
    return file


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (1 or 3 channels, any size) -> (pool features (B, 2048), logits (B, K)).

    Grey images are repeated to 3 channels and everything is resized to 299 x 299. The network runs without
    torchvision's `transform_input`: the TF-ported weights expect [-1, 1], which is the model range already.
    """

    feature_dim = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        self.num_classes = int(net.fc.out_features)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures takes images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        for name in _TRUNK:
            x = getattr(self.net, name)(x)  # (B, 3, 299, 299) -> ... -> (B, 2048, 1, 1)
        pool = torch.flatten(x, 1)  # (B, 2048)
        return pool, self.net.fc(self.net.dropout(pool))

    def features(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


def load_inception(path: str | Path, map_location: str | torch.device = "cpu") -> InceptionFeatures:
    """InceptionFeatures from a torchvision inception_v3 state_dict file (aux-logits keys included; the class
    count is read from fc.weight). Raises FileNotFoundError/ValueError naming eval.inception_weights."""
    file = check_inception_weights(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{KEY}={str(path)!r} is not a plain state_dict file readable with weights_only: "
                         f"{err}") from err
    if not isinstance(state, dict) or "fc.weight" not in state or not isinstance(state["fc.weight"], Tensor):
        raise ValueError(f"{KEY}={str(path)!r} is not an inception_v3 state_dict (no fc.weight tensor)")
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False,
                       num_classes=state["fc.weight"].shape[0])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{KEY}={str(path)!r} does not fit torchvision's inception_v3: {err}") from err
    return InceptionFeatures(net)
