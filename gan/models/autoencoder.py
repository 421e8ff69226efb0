"""The autoencoder families: `ae` (a deterministic MLP autoencoder, the dimensionality reducer) and `vae` (a Gaussian
encoder whose decoder is a generator sampled from the prior). Both build as (decoder, encoder) in the (G, D) slots
of the training state, so checkpoints, sampling and export treat the decoder as any other G(z, y)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gan.config import ModelConfig
from gan.models.families import register_model


def _mlp(widths: list[int]) -> list[nn.Module]:
    """Linear layers between consecutive `widths`, each followed by a ReLU."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return layers


class Encoder(nn.Module):
    """Images (B, C, H, W) in the model range -> latent codes.

    Deterministic (ae): prod(shape) -> hidden... -> z_dim, a ReLU after every layer, the code's included (the
    reference autoencoder's 784 -> 32 -> 128). Variational (vae): the last hidden layer feeds two linear heads, the
    mean and the log-variance of a diagonal Gaussian q(z | x); forward returns (mu, logvar)."""

    def __init__(self, data_shape: tuple[int, ...], hidden: tuple[int, ...], z_dim: int, *, variational: bool):
        super().__init__()
        self.z_dim, self.variational = z_dim, variational
        widths = [math.prod(data_shape), *hidden]
        if variational:
            self.body = nn.Sequential(nn.Flatten(), *_mlp(widths))
            self.mu = nn.Linear(widths[-1], z_dim)
            self.logvar = nn.Linear(widths[-1], z_dim)
        else:
            self.body = nn.Sequential(nn.Flatten(), *_mlp([*widths, z_dim]))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        h = self.body(x)
        if not self.variational:
            return h
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """z (B, z_dim) -> images: z -> hidden... (ReLU after each) -> prod(shape) pixel logits l.

    As a generator G(z, y) it returns 2 * sigmoid(l) - 1, the model range of the pixel means sigmoid(l) in [0, 1];
    `logits=True` returns l itself, which the Bernoulli likelihood needs for a stable log-probability. A Gaussian
    likelihood (`learn_sigma`) adds one learned log standard deviation shared by all pixels."""

    def __init__(self, z_dim: int, hidden: tuple[int, ...], data_shape: tuple[int, ...], *, learn_sigma: bool):
        super().__init__()
        self.z_dim = z_dim
        self.data_shape = tuple(data_shape)
        self.net = nn.Sequential(*_mlp([z_dim, *hidden]), nn.Linear(hidden[-1] if hidden else z_dim,
                                                                    math.prod(data_shape)))
        self.log_sigma = nn.Parameter(torch.zeros(())) if learn_sigma else None

    def forward(self, z: Tensor, y: Tensor | None = None, *, logits: bool = False) -> Tensor:
        out = self.net(z).view(-1, *self.data_shape)
        return out if logits else 2.0 * torch.sigmoid(out) - 1.0


def _check_images(family: str, data_shape: tuple[int, ...]) -> None:
    if len(data_shape) != 3:
        raise ValueError(f"the {family} family needs images (C, H, W), got data shape {data_shape}")


@register_model("ae")
def build_ae(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
             num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The deterministic autoencoder as (decoder, encoder); labels and loss.kind play no part."""
    _check_images("ae", data_shape)
    encoder = Encoder(data_shape, model.encoder_hidden, model.z_dim, variational=False)
    return Decoder(model.z_dim, model.decoder_hidden, data_shape, learn_sigma=False), encoder


@register_model("vae")
def build_vae(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
              num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The VAE as (decoder, encoder); the decoder learns its pixel sigma under the Gaussian likelihood."""
    _check_images("vae", data_shape)
    encoder = Encoder(data_shape, model.encoder_hidden, model.z_dim, variational=True)
    return Decoder(model.z_dim, model.decoder_hidden, data_shape,
                   learn_sigma=model.likelihood == "gaussian"), encoder
