"""The reference MLP GAN: fully connected G and D for 2-D points and small images."""

from __future__ import annotations

import math

from torch import Tensor, nn

from gan.config import ModelConfig
from gan.models.families import register_model
from gan.models.heads import (
    DiscriminatorHead,
    FourierFeatures,
    GaussianNoise,
    GeneratorInput,
    apply_spectral_norm,
    pack_samples,
)


class MLPGenerator(nn.Module):
    """z [+ embed(y)] -> hidden[0] -> ... -> hidden[-1] -> prod(data_shape), LeakyReLU(0.2) between, tanh.

    With `batch_norm`, BatchNorm1d before each hidden activation (PacGAN's 2-D G).
    """

    def __init__(self, z_dim: int, hidden: tuple[int, ...], data_shape: tuple[int, ...],
                 num_classes: int = 0, *, batch_norm: bool = False, latent_codes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.data_shape = tuple(data_shape)
        self.input = GeneratorInput(z_dim, num_classes, latent_codes=latent_codes)
        widths = [self.input.out_features, *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            # BatchNorm's mean subtraction cancels a bias before it.
            layers.append(nn.Linear(w_in, w_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(w_out))
            layers.append(nn.LeakyReLU(0.2))
        layers += [nn.Linear(widths[-1], math.prod(self.data_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(self.input(z, y)).view(-1, *self.data_shape)


class MLPDiscriminator(nn.Module):
    """prod(data_shape) -> hidden[-1] -> ... -> hidden[0] -> head, LeakyReLU(0.2) between, logits out.

    Optionally each sample first gets `fourier_features` random Fourier features (scale `fourier_scale`),
    and `pack` samples are judged together (PacGAN): the first layer then takes `pack` samples' inputs side by
    side and a batch of B samples gives B / pack logits. `input_noise` and `hidden_noise` add Gaussian noise of
    that std to the first layer's input and to every later layer's (the head's included) in training mode, and
    `weight_norm` reparametrises every Linear as g v / ||v||: Salimans et al. 2016's semi-supervised D.
    """

    def __init__(self, hidden: tuple[int, ...], data_shape: tuple[int, ...], num_classes: int = 0, *,
                 conditional: bool = False, semi_supervised: bool = False, pack: int = 1,
                 fourier_features: int = 0, fourier_scale: float = 1.0, input_noise: float = 0.0,
                 hidden_noise: float = 0.0, weight_norm: bool = False):
        super().__init__()
        self.pack = pack
        self.features = (FourierFeatures(math.prod(data_shape), fourier_features, fourier_scale)
                         if fourier_features else None)
        per_sample = self.features.out_features if self.features is not None else math.prod(data_shape)
        widths = [per_sample * pack, *reversed(hidden)]
        # forward flattens before the features; this Flatten stays so that saved D checkpoints keep their keys
        # (and noise layers, which hold no weights, are only inserted when on, for the same reason).
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            noise = input_noise if i == 0 else hidden_noise
            layers += [GaussianNoise(noise)] if noise > 0 else []
            layers += [_linear(w_in, w_out, weight_norm), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head_noise = GaussianNoise(hidden_noise) if hidden_noise > 0 else None
        self.head = DiscriminatorHead(hidden[0], num_classes, conditional=conditional,
                                      semi_supervised=semi_supervised)
        if weight_norm:
            self.head.linear = nn.utils.parametrizations.weight_norm(self.head.linear)

    def forward(self, x: Tensor, y: Tensor | None = None, *, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with `features`, (logits, the last hidden layer's (B, F) features, before any noise)."""
        x = x.flatten(1)
        if self.features is not None:
            x = self.features(x)
        h = self.body(pack_samples(x, self.pack))
        out = self.head(h if self.head_noise is None else self.head_noise(h), y)
        return (out, h) if features else out


def _linear(w_in: int, w_out: int, weight_norm: bool) -> nn.Module:
    linear = nn.Linear(w_in, w_out)
    return nn.utils.parametrizations.weight_norm(linear) if weight_norm else linear


@register_model("mlp")
def build(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
          num_classes: int) -> tuple[nn.Module, nn.Module]:
    """MLP (G, D); D has no normalisation layers, so every loss (wgan-gp included) takes it as is."""
    G = MLPGenerator(model.z_dim, model.hidden, data_shape, num_classes if model.conditional else 0,
                     batch_norm=model.g_batch_norm, latent_codes=model.latent_codes)
    D = MLPDiscriminator(model.hidden, data_shape, num_classes, conditional=model.conditional,
                         semi_supervised=model.semi_supervised, pack=model.pack,
                         fourier_features=model.d_fourier_features, fourier_scale=model.d_fourier_scale,
                         input_noise=model.d_input_noise, hidden_noise=model.d_hidden_noise,
                         weight_norm=model.d_weight_norm)
    if model.spectral_norm:
        apply_spectral_norm(D)
    return G, D
