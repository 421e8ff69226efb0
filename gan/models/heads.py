"""Pieces both families share: G's latent and label input, D's realness / projection / K+1 head, spectral norm."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from gan.config_checks import ConfigError

LABEL_EMBED_MAX = 50
CODE_EMBED_DIM = 8


def realness_logit(out: Tensor) -> Tensor:
    """D's output -> (B,) realness logits, the input of every adversarial loss.

    (B,) passes through. Semi-supervised (B, K+1) logits (K classes, fake at index K) give
    logsumexp(out[:, :K]) - out[:, K] (Salimans et al. 2016): its sigmoid is 1 - p(fake | x).
    """
    if out.dim() == 1:
        return out
    if out.dim() == 2 and out.shape[1] >= 3:
        return torch.logsumexp(out[:, :-1], dim=1) - out[:, -1]
    raise ValueError(f"D output must have shape (B,) or (B, K+1) with K >= 2, got {tuple(out.shape)}")


class GeneratorInput(nn.Module):
    """z -> G's first layer input: z, or with `latent_codes` K, z[:, 0] read as one of K discrete codes; for a
    conditional G, a learned embedding of y beside it.

    The label embedding has min(z_dim, 50) dims: a one-hot would grow G's first layer with K, and staying
    below z_dim keeps the latent the larger share of the input. It keeps nn.Embedding's N(0, 1) init,
    the same scale as z.

    Latent codes: the bin of the normal CDF of z[:, 0] among K equal bins, so each code has probability 1/K
    exactly while z stays N(0, I) for every caller. The code's learned embedding (CODE_EMBED_DIM dims, N(0, 1)
    init) takes z[:, 0]'s place. No gradient reaches z[:, 0], and none is needed: z is never optimised.
    """

    def __init__(self, z_dim: int, num_classes: int = 0, *, latent_codes: int = 0):
        super().__init__()
        if latent_codes and z_dim < 2:
            raise ValueError(f"latent codes take z[:, 0], so z_dim must be >= 2, got {z_dim}")
        self.latent_codes = latent_codes
        self.codes = nn.Embedding(latent_codes, CODE_EMBED_DIM) if latent_codes else None
        self.embed = nn.Embedding(num_classes, min(z_dim, LABEL_EMBED_MAX)) if num_classes else None
        latent_features = z_dim - 1 + CODE_EMBED_DIM if latent_codes else z_dim
        self.out_features = latent_features + (self.embed.embedding_dim if self.embed is not None else 0)

    def code_of(self, z: Tensor) -> Tensor:
        """(B,) int64 code of each latent, in [0, latent_codes)."""
        uniform = 0.5 * (1.0 + torch.erf(z[:, 0] / math.sqrt(2.0)))
        return (uniform * self.latent_codes).long().clamp_(0, self.latent_codes - 1)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.codes is not None:
            z = torch.cat([z[:, 1:], self.codes(self.code_of(z))], dim=1)
        if self.embed is None:
            return z
        if y is None:
            raise ValueError("a conditional G needs class labels y of shape (B,)")
        return torch.cat([z, self.embed(y)], dim=1)


class DiscriminatorHead(nn.Module):
    """(B, F) features [+ y] -> D's logits.

    plain: (B,) from Linear(F, 1). conditional: (B,) projection psi(h) + <embed(y), h> (Miyato & Koyama
    2018). semi-supervised: (B, K+1) class logits with fake at index K; `realness_logit` reduces them.

    Every family's D calls it last, and `D(x, y, features=True)` returns (logits, h) with h the (B, F) features
    it was given (the last hidden layer): G's feature matching reads them. A keyword of forward rather than a
    method, so a DDP-wrapped D is still called through its wrapper.
    """

    def __init__(self, features: int, num_classes: int = 0, *, conditional: bool = False,
                 semi_supervised: bool = False):
        super().__init__()
        if conditional and semi_supervised:
            raise ValueError("model.semi_supervised cannot be combined with model.conditional")
        if (conditional or semi_supervised) and num_classes < 2:
            key = "model.conditional" if conditional else "model.semi_supervised"
            raise ValueError(f"{key} needs >= 2 classes, got num_classes={num_classes}")
        self.semi_supervised = semi_supervised
        self.linear = nn.Linear(features, num_classes + 1 if semi_supervised else 1)
        self.embed = nn.Embedding(num_classes, features) if conditional else None
        if self.embed is not None:
            # N(0, 1) rows on a wide F would make <embed(y), h> dwarf psi(h) at init.
            nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.linear(h)
        if self.semi_supervised:
            return out  # (B, K+1)
        out = out.squeeze(1)  # (B,)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional D needs class labels y of shape (B,)")
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


def pack_samples(x: Tensor, pack: int) -> Tensor:
    """PacGAN's packing: (B, F, ...) -> (B // pack, pack * F, ...), each run of `pack` consecutive samples
    joined along their first axis (features for vectors, channels for images)."""
    if pack == 1:
        return x
    if x.shape[0] % pack:
        raise ValueError(f"model.pack={pack} needs batches whose size is a multiple of it, got {x.shape[0]}")
    return x.reshape(x.shape[0] // pack, pack * x.shape[1], *x.shape[2:])


class ImageDiscriminator(nn.Module):
    """The forward pass the image families' D share: `pack_samples` -> `body` (to (B, F) features) -> `head`; the
    subclass builds `pack`, `body` and `head`."""

    pack: int
    body: nn.Module
    head: DiscriminatorHead

    def forward(self, x: Tensor, y: Tensor | None = None, *, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with `features`, (logits, the last hidden layer's (B, F) features) (see DiscriminatorHead)."""
        h = self.body(pack_samples(x, self.pack))
        out = self.head(h, y)
        return (out, h) if features else out


class FourierFeatures(nn.Module):
    """(B, d) -> (B, d + 2F): x beside sin(x W) and cos(x W), W a fixed (d, F) draw of N(0, scale^2).

    Random Fourier features (Tancik et al. 2020) let an MLP fit functions far narrower than its input's
    range, which a plain ReLU MLP learns only after very long training. W is a seeded buffer: the same on
    every worker, and saved with D.
    """

    def __init__(self, in_features: int, num_features: int, scale: float, seed: int = 0):
        super().__init__()
        weight = torch.randn(in_features, num_features, generator=torch.Generator().manual_seed(seed)) * scale
        self.register_buffer("weight", weight)
        self.out_features = in_features + 2 * num_features

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.weight
        return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)


class GaussianNoise(nn.Module):
    """x + N(0, std^2) noise in training mode, x itself in eval mode (Salimans et al. 2016's D regulariser)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.std == 0:
            return x
        return x + self.std * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"std={self.std}"


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectrally normalises every Linear, Conv2d and Embedding weight in `module`, in place.

    Call it after weight init: a parametrised weight is recomputed from `.original` on each access.
    """
    for m in list(module.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            spectral_norm(m)
    return module


def image_shape(data_shape: tuple[int, ...], family: str, sides: tuple[int, ...]) -> tuple[int, int]:
    """(channels, side) of the (C, H, W) images a conv family builds for; a clear error for any other shape."""
    if len(data_shape) != 3:
        raise ConfigError(f"model.family {family} needs image data of shape (C, H, W), got {data_shape}")
    channels, height, width = data_shape
    if height != width or height not in sides:
        raise ConfigError(f"data.resolution must be one of {sides} (square) for {family}, got {height}x{width}")
    if channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3 for {family}, got {channels}")
    return channels, height
