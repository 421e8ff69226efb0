"""DiffAugment: every policy passes gradients back to the images (so to G), keeps them in [-1, 1], and changes them."""

import pytest
import torch

from gan.augment import CUTOUT_RATIO, color, cutout, diff_augment, translation
from gan.config import ConfigError
from gan.config_loader import load_config


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_policy_is_differentiable_in_range_and_random(policy, channels):
    torch.manual_seed(0)
    x = (torch.rand(16, channels, 28, 28) * 2 - 1).requires_grad_(True)
    out = diff_augment(policy)(x)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_through_a_generator_the_gradient_reaches_its_weights():
    G = torch.nn.Sequential(torch.nn.Linear(8, 3 * 16 * 16), torch.nn.Tanh(), torch.nn.Unflatten(1, (3, 16, 16)))
    for op in (color, translation, cutout):
        G.zero_grad()
        op(G(torch.randn(4, 8))).pow(2).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters()), op.__name__


def test_translation_shifts_whole_pixels_and_cutout_blanks_a_square():
    torch.manual_seed(1)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    shifted = translation(x)
    for i in range(8):  # some whole-pixel shift (up to 2 of 16) reproduces the image away from the edges
        assert any(torch.allclose(shifted[i, :, 2:-2, 2:-2], torch.roll(x[i], (dy, dx), (1, 2))[:, 2:-2, 2:-2])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    blank = (cutout(torch.ones(8, 1, 16, 16)) == 0).sum(dim=(1, 2, 3))
    side = int(16 * CUTOUT_RATIO) + 1  # the square spans centre +- side // 2, clipped at the edges
    assert blank.max() <= side ** 2 and blank.min() > 0


def test_the_setting_names_known_policies_for_images_only():
    assert diff_augment("") is None
    assert load_config(None, ["data.source=digits", "model.diffaugment=color,cutout"]).model.diffaugment
    with pytest.raises(ConfigError, match="model.diffaugment must list policies among color, translation, cutout"):
        load_config(None, ["data.source=digits", "model.diffaugment=flip"])
    with pytest.raises(ConfigError, match="model.diffaugment augments images"):
        load_config(None, ["data.source=ring8", "model.diffaugment=color"])
