"""Trained networks packaged for serving: a generator (latents in, images in [0, 1] or 2-D points in data units out),
an autoencoder's encoder (images in, codes out) and a semi-supervised GAN's classifier (images in, class logits out)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from gan.metrics.semi_supervised import ClassLogits


class ServedGenerator(nn.Module):
    """Wraps G so that its output needs no knowledge of the training range.

    Unconditional: `forward(z)`, z (B, z_dim) float32. Conditional: `forward(z, y)`, y (B,) int64 class labels.
    Images come out as float32 (B, C, H, W) in [0, 1]; 2-D points as (B, 2) in the data's coordinates."""

    def __init__(self, G: nn.Module, *, z_dim: int, points: bool, scale: float = 1.0, num_classes: int = 0):
        super().__init__()
        self.G = G.eval().requires_grad_(False)
        self.z_dim = z_dim
        self.points = points
        self.scale = scale
        self.num_classes = num_classes

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.G(z, y)
        if self.points:
            return out * self.scale
        return (out.clamp(-1.0, 1.0) + 1.0) * 0.5

    def example_inputs(self, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
        """A seeded input example (a batch of at least 2 so that the exported batch dimension stays dynamic)."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(max(2, batch), self.z_dim, generator=gen).numpy()
        if not self.num_classes:
            return (z,)
        return z, (np.arange(z.shape[0]) % self.num_classes).astype(np.int64)


def served_generator(G: nn.Module, *, z_dim: int, points: bool, scale: float, conditional: bool,
                     num_classes: int) -> ServedGenerator:
    """The generator as registered: G's conditioning input is kept only for conditional models."""
    return ServedGenerator(G, z_dim=z_dim, points=points, scale=scale,
                           num_classes=num_classes if conditional else 0)


def _example_images(data_shape: tuple[int, ...], batch: int, seed: int) -> tuple[np.ndarray]:
    """Seeded uniform pixels in [0, 1], a batch of at least 2 (so the exported batch dimension stays dynamic)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(max(2, batch), *data_shape, generator=gen).numpy(),)


class ServedEncoder(nn.Module):
    """An autoencoder's encoder packaged for serving, the dimensionality reducer: images (B, C, H, W) float32 in
    [0, 1] in, latent codes (B, z_dim) out (a VAE's: the posterior mean)."""

    def __init__(self, encoder: nn.Module, *, data_shape: tuple[int, ...], z_dim: int):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.data_shape = tuple(data_shape)
        self.z_dim = z_dim

    def forward(self, x: Tensor) -> Tensor:
        encoded = self.encoder(x * 2.0 - 1.0)
        return encoded[0] if isinstance(encoded, tuple) else encoded

    def example_inputs(self, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
        return _example_images(self.data_shape, batch, seed)


class ServedClassifier(nn.Module):
    """A semi-supervised GAN's K+1 discriminator packaged as a K-class classifier: images (B, C, H, W) float32 in
    [0, 1] in, class logits (B, K) out (the fake logit dropped, so argmax is the predicted class)."""

    def __init__(self, D: nn.Module, *, data_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.classifier = ClassLogits(D.eval().requires_grad_(False))
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x * 2.0 - 1.0)

    def example_inputs(self, batch: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
        return _example_images(self.data_shape, batch, seed)


class PixelRangeView(nn.Module):
    """A served encoder or classifier (images in [0, 1]) seen as a training-time network again: it takes model-range
    images [-1, 1], so the evaluation code scores a registered model exactly like a checkpoint's."""

    def __init__(self, served: nn.Module):
        super().__init__()
        self.served = served

    def train(self, mode: bool = True) -> PixelRangeView:
        self.training = mode  # an exported (pt2) module refuses train()/eval()
        return self

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.served((x + 1.0) * 0.5)


class ModelRangeView(nn.Module):
    """A served generator seen as a training-time G again: images mapped back to [-1, 1], 2-D points left in data
    units (score them with scale 1), so the evaluation code scores a registered model exactly like a checkpoint."""

    def __init__(self, served: nn.Module, *, points: bool):
        super().__init__()
        self.served = served
        self.points = points

    def train(self, mode: bool = True) -> ModelRangeView:
        # An exported (pt2) module is frozen in eval mode and refuses train()/eval(); only this wrapper flips.
        self.training = mode
        return self

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.served(z) if y is None else self.served(z, y)
        return out if self.points else out * 2.0 - 1.0
