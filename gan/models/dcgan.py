"""DCGAN (Radford et al. 2016) G and D for 28, 32 and 64 pixel images with 1 or 3 channels."""

from __future__ import annotations

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

# Side of G's first feature map (and D's last) -> stride-2 stages up to the resolution.
STEM = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


def dcgan_init(m: nn.Module) -> None:
    """DCGAN init: conv/linear weights N(0, 0.02), biases 0; BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z [+ embed(y)] -> Linear -> (B, C0, s0, s0) -> ConvTranspose2d(4, 2, 1) stages -> tanh image.

    With g = g_width and C image channels:
      28: (B, 2g, 7, 7) -> (B, g, 14, 14) -> (B, C, 28, 28)
      32: (B, 4g, 4, 4) -> (B, 2g, 8, 8) -> (B, g, 16, 16) -> (B, C, 32, 32)
      64: (B, 8g, 4, 4) -> (B, 4g, 8, 8) -> (B, 2g, 16, 16) -> (B, g, 32, 32) -> (B, C, 64, 64)
    """

    def __init__(self, z_dim: int, g_width: int, channels: int, resolution: int, num_classes: int = 0, *,
                 latent_codes: int = 0):
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        s0, stages = STEM[resolution]
        c = g_width * 2 ** (stages - 1)
        self.input = GeneratorInput(z_dim, num_classes, latent_codes=latent_codes)
        # Biases before BatchNorm are cancelled by its mean subtraction, so those layers have none.
        layers: list[nn.Module] = [
            nn.Linear(self.input.out_features, c * s0 * s0, bias=False),
            nn.Unflatten(1, (c, s0, s0)),  # (B, C0, s0, s0)
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for _ in range(stages - 1):  # (B, c, s, s) -> (B, c/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]  # (B, C, res, res)
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(self.input(z, y))


class DCGANDiscriminator(ImageDiscriminator):
    """Image -> stages of Conv2d(4, 2, 1) [+ Conv2d(3, 1, 1) ...] (d, 2d, 4d, ... channels) -> flatten -> head.

    With d = d_width: 28: (B, d, 14, 14) -> (B, 2d, 7, 7); 32: ... -> (B, 4d, 4, 4); 64: ... -> (B, 8d, 4, 4).
    Each stage has `convs_per_stage` - 1 extra 3x3 stride-1 convs after its stride-2 conv, keeping its
    channels and resolution. BatchNorm after every conv but the first unless `batch_norm` is False (wgan-gp:
    its gradient penalty is per sample, and BatchNorm mixes the samples of a batch). With `pack` > 1 it judges
    `pack` images at once, stacked along the channels (PacGAN). `fan_in_init` keeps PyTorch's fan-in scaled
    initialisation instead of DCGAN's N(0, 0.02), which without BatchNorm shrinks the activations at every layer.
    """

    def __init__(self, d_width: int, channels: int, resolution: int, num_classes: int = 0, *,
                 batch_norm: bool = True, conditional: bool = False, semi_supervised: bool = False,
                 convs_per_stage: int = 1, pack: int = 1, fan_in_init: bool = False):
        super().__init__()
        self.pack = pack
        s0, stages = STEM[resolution]
        layers: list[nn.Module] = []
        c_in, c = channels * pack, d_width
        for i in range(stages):  # (B, c_in, s, s) -> (B, c, s/2, s/2)
            for j in range(convs_per_stage):
                norm = batch_norm and (i > 0 or j > 0)
                conv = nn.Conv2d(c_in, c, 4, 2, 1, bias=not norm) if j == 0 else nn.Conv2d(c, c, 3, 1, 1, bias=not norm)
                layers.append(conv)
                if norm:
                    layers.append(nn.BatchNorm2d(c))
                layers.append(nn.LeakyReLU(0.2))
            c_in, c = c, c * 2
        layers.append(nn.Flatten())  # (B, c_in * s0 * s0)
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(c_in * s0 * s0, num_classes, conditional=conditional,
                                      semi_supervised=semi_supervised)
        if not fan_in_init:
            self.apply(dcgan_init)


@register_model("dcgan")
def build(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
          num_classes: int) -> tuple[nn.Module, nn.Module]:
    """DCGAN (G, D) for (C, H, W) images with H == W in (28, 32, 64) and C in (1, 3)."""
    channels, height = image_shape(data_shape, "dcgan", tuple(STEM))
    G = DCGANGenerator(model.z_dim, model.g_width, channels, height, num_classes if model.conditional else 0,
                       latent_codes=model.latent_codes)
    # A K+1 D is also a classifier, read in eval mode, where BatchNorm's running statistics would mix the real, fake
    # and labelled batches of training: it has none, and so the fan-in init (MNIST with 100 labels, fan-in init
    # against DCGAN's: test accuracy 0.97 against 0.94).
    D = DCGANDiscriminator(model.d_width, channels, height, num_classes,
                           batch_norm=loss_kind != "wgan-gp" and not model.semi_supervised,
                           conditional=model.conditional, semi_supervised=model.semi_supervised,
                           convs_per_stage=model.d_convs_per_stage, pack=model.pack,
                           fan_in_init=model.semi_supervised)
    if model.spectral_norm:
        apply_spectral_norm(D)
    return G, D
