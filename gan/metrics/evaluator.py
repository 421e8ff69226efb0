"""The evaluator: a small CNN classifier of the real data whose features and logits stand in for Inception's."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan import storage
from gan.config import EVALUATOR_FEATURES
from gan.data.transforms import shift_and_zoom, to_model_range
from gan.rendering import eval_mode

log = logging.getLogger(__name__)

WEIGHTS_FILE = "evaluator.pt"
META_FILE = "evaluator.json"
FORMAT_VERSION = 1


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Evaluator(nn.Module):
    """Images in the model range [-1, 1] -> `features` (B, feature_dim) -> `logits` (B, num_classes).

    With w = width and a (C, R, R) input:
      (B, w, R/2, R/2) -> (B, 2w, R/4, R/4) -> (B, 4w, R/4, R/4) -> (B, 4w, 4, 4) -> (B, F) -> (B, K)
    """

    def __init__(self, *, in_channels: int, resolution: int, num_classes: int, feature_dim: int = EVALUATOR_FEATURES,
                 width: int = 16):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if num_classes < 2:
            raise ValueError(f"the evaluator needs >= 2 classes, got num_classes={num_classes}")
        self.args = {"in_channels": in_channels, "resolution": resolution, "num_classes": num_classes,
                     "feature_dim": feature_dim, "width": width}
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.input_shape = (in_channels, resolution, resolution)
        w = width
        self.trunk = nn.Sequential(
            _block(in_channels, w), nn.MaxPool2d(2),  # (B, w, R/2, R/2)
            _block(w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, R/4, R/4)
            _block(2 * w, 4 * w),  # (B, 4w, R/4, R/4)
            # A fixed 4x4 grid keeps the head the same for every resolution while keeping where strokes are.
            nn.AdaptiveAvgPool2d(4),  # (B, 4w, 4, 4)
            nn.Flatten(),  # (B, 64w)
        )
        self.embed = nn.Sequential(nn.Linear(64 * w, feature_dim), nn.ReLU())  # (B, F)
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(feature_dim, num_classes)  # (B, K)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"the evaluator takes images (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim): the space of FID, KID and precision/recall."""
        self._check(x)
        return self.embed(self.trunk(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs of one pass, so metrics that need each do not run the network twice."""
        f = self.features(x)
        return f, self.classifier(self.dropout(f))

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


@torch.no_grad()
def accuracy(model: nn.Module, x_uint8: np.ndarray | Tensor, y: np.ndarray | Tensor, batch_size: int = 1000) -> float:
    """Share of `x_uint8` that `model` classifies as `y`, in eval mode."""
    with eval_mode(model):
        x, y = torch.as_tensor(x_uint8), torch.as_tensor(y)
        correct = sum(int((model(to_model_range(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
        return correct / max(len(x), 1)


def train_evaluator(x_train_uint8: np.ndarray, y_train: np.ndarray, x_test_uint8: np.ndarray, y_test: np.ndarray,
                    *, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                    feature_dim: int = EVALUATOR_FEATURES, width: int = 16, augment: bool = True,
                    device: torch.device | str = "cpu") -> tuple[Evaluator, float]:
    """Trains an Evaluator on uint8 images (N, C, H, W) with labels on `device`; returns it in eval mode (on the
    CPU) and its test accuracy. Adam under a one-cycle schedule; the same seed gives the same weights on the CPU (a
    GPU's differ in the last bits, and so does the evaluator's id, a hash of its weights). The caller's RNG is
    untouched."""
    x_train, y_train = torch.as_tensor(np.asarray(x_train_uint8)), torch.as_tensor(np.asarray(y_train)).long()
    if x_train.dtype != torch.uint8 or x_train.dim() != 4 or x_train.shape[2] != x_train.shape[3]:
        raise ValueError(f"x_train must be uint8 square images (N, C, H, W), got {x_train.dtype} {list(x_train.shape)}")
    if len(y_train) != len(x_train) or len(y_test) != len(x_test_uint8):
        raise ValueError("every image needs a label")
    if (y_train < 0).any():
        raise ValueError("y_train has unlabelled (-1) examples; the evaluator needs every label")
    num_classes = int(max(y_train.max(), int(np.max(y_test, initial=-1)))) + 1
    steps_per_epoch = max(1, len(x_train) // batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = Evaluator(in_channels=x_train.shape[1], resolution=x_train.shape[2], num_classes=num_classes,
                          feature_dim=feature_dim, width=width).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x_train), generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x = to_model_range(x_train[idx]).to(device)
                if augment:
                    x = shift_and_zoom(x, gen)
                loss = F.cross_entropy(model(x), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            log.info("evaluator epoch %d: loss %.4f", epoch + 1, total / steps_per_epoch)
    model.eval()
    return model.cpu(), accuracy(model.cpu(), x_test_uint8, y_test)


def evaluator_id(model: nn.Module) -> str:
    """First 16 hex of a sha256 over the state_dict (names, dtypes, shapes, bytes) in sorted key order: equal
    ids mean equal weights, so metrics under the same id compare."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_evaluator(model: Evaluator, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Writes evaluator.pt (a plain state_dict) and evaluator.json (constructor args, id, `meta`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    info = {"format_version": FORMAT_VERSION, "args": model.args, "evaluator_id": evaluator_id(model),
            "meta": meta or {}}
    (directory / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return directory


def evaluator_meta(directory: str | Path) -> dict[str, Any]:
    """The evaluator.json of a saved evaluator (a local folder or a storage URI): format_version, args,
    evaluator_id, meta."""
    path = storage.join(directory, META_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"no evaluator at {directory}: {META_FILE} is missing")
    info = json.loads(storage.read_bytes(path).decode())
    if info["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {info['format_version']!r}; this code reads {FORMAT_VERSION}")
    return info


def load_evaluator(directory: str | Path, map_location: str | torch.device = "cpu") -> Evaluator:
    """The saved Evaluator in eval mode; raises ValueError when its weights do not hash to the recorded id."""
    info = evaluator_meta(directory)
    model = Evaluator(**info["args"])
    weights = storage.join(directory, WEIGHTS_FILE)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(weights)), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"evaluator weights {weights} are truncated or unreadable: {err}") from err
    model.load_state_dict(state)
    found = evaluator_id(model)
    if found != info["evaluator_id"]:
        raise ValueError(f"evaluator at {directory} has id {found}, but {META_FILE} records {info['evaluator_id']}")
    return model.eval()
