"""A residual image family without normalisation layers, in the spirit of R3GAN (Huang et al. 2024): G and D of
residual blocks whose last conv starts at zero (so every block starts as the identity and no normalisation is
needed to keep activations in scale), nearest upsampling in G, average pooling in D; 28, 32, 64 and 128 px, 1 or 3
channels, with the conditional and semi-supervised heads the other families use."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gan.config import ModelConfig
from gan.models.families import register_model
from gan.models.heads import DiscriminatorHead, GeneratorInput, apply_spectral_norm, image_shape, pack_samples

# Side of G's first feature map (and D's last) -> resolution-doubling stages.
STEM = {28: (7, 2), 32: (4, 3), 64: (4, 4), 128: (4, 5)}
MAX_WIDTH_FACTOR = 8
"""Channels stop doubling at 8x the width (as StyleGAN-like networks cap them), so 128 px stays affordable."""
SLOPE = 0.2


class ResidualBlock(nn.Module):
    """x + conv(lrelu(conv(lrelu(x)))), the second conv zero-initialised: the identity at the start."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, SLOPE)), SLOPE))


def _widths(width: int, stages: int) -> list[int]:
    """Channels per stage from the lowest resolution up: width x 2^(stages-1-i), capped."""
    return [width * min(2 ** (stages - 1 - i), MAX_WIDTH_FACTOR) for i in range(stages)]


class ResNetGenerator(nn.Module):
    """z [+ embed(y)] -> Linear -> (B, c0, s0, s0) -> [block, upsample x2, 1x1 conv to the next width] per stage ->
    block -> 1x1 conv -> image. At 32 px with g = g_width: (B, 4g, 4, 4) -> (B, 2g, 8, 8) -> (B, g, 16, 16) ->
    (B, g, 32, 32) -> (B, C, 32, 32).

    The output is linear while training, as in StyleGAN and R3GAN: without normalisation layers a tanh saturates on
    the first thing G learns, MNIST's flat -1 background, and its gradient vanishes (measured: every sample all -1
    within 2 kimg, under bce and rpgan alike). D learns to reject values outside [-1, 1]; in eval mode (G_ema,
    sampling, serving) the output is clamped to that range."""

    def __init__(self, z_dim: int, g_width: int, channels: int, resolution: int, num_classes: int = 0, *,
                 latent_codes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        s0, stages = STEM[resolution]
        widths = _widths(g_width, stages) + [g_width]
        self.input = GeneratorInput(z_dim, num_classes, latent_codes=latent_codes)
        layers: list[nn.Module] = [nn.Linear(self.input.out_features, widths[0] * s0 * s0),
                                   nn.Unflatten(1, (widths[0], s0, s0))]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [ResidualBlock(c_in), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 1)]
        layers += [ResidualBlock(widths[-1]), nn.LeakyReLU(SLOPE), nn.Conv2d(widths[-1], channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x = self.net(self.input(z, y))
        return x if self.training else x.clamp(-1.0, 1.0)


class ResNetDiscriminator(nn.Module):
    """Image -> 1x1 conv -> [block, 1x1 conv to the next width, average pool /2] per stage -> block -> flatten ->
    head. With `pack` > 1 it judges `pack` images at once, stacked along the channels (PacGAN)."""

    def __init__(self, d_width: int, channels: int, resolution: int, num_classes: int = 0, *,
                 conditional: bool = False, semi_supervised: bool = False, pack: int = 1):
        super().__init__()
        self.pack = pack
        s0, stages = STEM[resolution]
        widths = [d_width] + _widths(d_width, stages)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(channels * pack, widths[0], 1)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [ResidualBlock(c_in), nn.Conv2d(c_in, c_out, 1), nn.AvgPool2d(2)]
        layers += [ResidualBlock(widths[-1]), nn.LeakyReLU(SLOPE), nn.Flatten()]  # (B, c * s0 * s0)
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(widths[-1] * s0 * s0, num_classes, conditional=conditional,
                                      semi_supervised=semi_supervised)

    def forward(self, x: Tensor, y: Tensor | None = None, *, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with `features`, (logits, the last hidden layer's (B, F) features) (see DiscriminatorHead)."""
        h = self.body(pack_samples(x, self.pack))
        out = self.head(h, y)
        return (out, h) if features else out


@register_model("resnet")
def build(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
          num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Residual (G, D) for (C, H, W) images with H == W in (28, 32, 64, 128) and C in (1, 3)."""
    channels, height = image_shape(data_shape, "resnet", tuple(STEM))
    G = ResNetGenerator(model.z_dim, model.g_width, channels, height, num_classes if model.conditional else 0,
                        latent_codes=model.latent_codes)
    D = ResNetDiscriminator(model.d_width, channels, height, num_classes, conditional=model.conditional,
                            semi_supervised=model.semi_supervised, pack=model.pack)
    if model.spectral_norm:
        for block in (m for m in D.modules() if isinstance(m, ResidualBlock)):
            block.conv2.reset_parameters()  # spectral norm divides by the weight's norm: a zero one gives NaN
        apply_spectral_norm(D)
    return G, D
