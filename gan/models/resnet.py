"""A residual image family without normalisation layers, in the spirit of R3GAN (Huang et al. 2024): G of residual
blocks whose last conv starts at zero (so G starts as a smooth upsampling of its first map and no normalisation is
needed to keep activations in scale) with bilinear upsampling; D of residual blocks between stride-2 convs; 28, 32,
64 and 128 px, 1 or 3 channels, with the conditional and semi-supervised heads the other families use.

Measured on MNIST (2 CPU cores, 75 s each, FID of 2k samples; bench/quality.py has the preset-level rows): nearest
upsampling left G's samples blocky (FID 323 -> 241 with bilinear); a D whose blocks start as the identity is a linear
map of the image at first and learns slowly (FID 202 -> 105 with its blocks' second convs at PyTorch's default
init); average pooling plus a 1x1 conv per D stage cost more time per image than one stride-2 conv."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gan.config import ModelConfig
from gan.models.families import register_model
from gan.models.heads import (
    DiscriminatorHead,
    GeneratorInput,
    ImageDiscriminator,
    apply_spectral_norm,
    image_shape,
)

# Side of G's first feature map (and D's last) -> resolution-doubling stages.
STEM = {28: (7, 2), 32: (4, 3), 64: (4, 4), 128: (4, 5)}
MAX_WIDTH_FACTOR = 8
"""Channels stop doubling at 8x the width (as StyleGAN-like networks cap them), so 128 px stays affordable."""
SLOPE = 0.2


class ResidualBlock(nn.Module):
    """x + conv(lrelu(conv(lrelu(x)))); with `identity_at_start` the second conv is zero-initialised, so the block
    starts as the identity (G's blocks; D's keep PyTorch's init, see the module's docstring)."""

    def __init__(self, channels: int, *, identity_at_start: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        if identity_at_start:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, SLOPE)), SLOPE))


def _widths(width: int, stages: int) -> list[int]:
    """Channels per stage from the lowest resolution up: width x 2^(stages-1-i), capped."""
    return [width * min(2 ** (stages - 1 - i), MAX_WIDTH_FACTOR) for i in range(stages)]


class ResNetGenerator(nn.Module):
    """z [+ embed(y)] -> Linear -> (B, c0, s0, s0) -> [block, bilinear x2, 1x1 conv to the next width] per stage ->
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
            layers += [ResidualBlock(c_in), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(c_in, c_out, 1)]
        layers += [ResidualBlock(widths[-1]), nn.LeakyReLU(SLOPE), nn.Conv2d(widths[-1], channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x = self.net(self.input(z, y))
        return x if self.training else x.clamp(-1.0, 1.0)


class ResNetDiscriminator(ImageDiscriminator):
    """Image -> [stride-2 4x4 conv to the stage's width, block] per stage -> lrelu -> flatten -> head. At 32 px with
    d = d_width: (B, d, 16, 16) -> (B, 2d, 8, 8) -> (B, 4d, 4, 4). With `pack` > 1 it judges `pack` images at once,
    stacked along the channels (PacGAN)."""

    def __init__(self, d_width: int, channels: int, resolution: int, num_classes: int = 0, *,
                 conditional: bool = False, semi_supervised: bool = False, pack: int = 1):
        super().__init__()
        self.pack = pack
        s0, stages = STEM[resolution]
        widths = _widths(d_width, stages)[::-1]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([channels * pack, *widths[:-1]], widths, strict=True)):
            # The block's output is pre-activation (x + branch), so the next stride-2 conv gets its own lrelu.
            layers += [nn.LeakyReLU(SLOPE)] if i else []
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), ResidualBlock(c_out, identity_at_start=False)]
        layers += [nn.LeakyReLU(SLOPE), nn.Flatten()]  # (B, c * s0 * s0)
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(widths[-1] * s0 * s0, num_classes, conditional=conditional,
                                      semi_supervised=semi_supervised)


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
        apply_spectral_norm(D)  # D's blocks have no zero weights, whose norm would be divided by
    return G, D
