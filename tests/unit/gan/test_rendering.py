"""Sample grids: one row per class with a latent per column, and the PNG's layout and pixel values."""

import numpy as np
import pytest
import torch
from PIL import Image

from gan.rendering import class_grid_inputs, save_image_grid, save_loss_curves


def test_class_grid_has_one_row_per_class_in_the_given_order_and_a_latent_per_column():
    z, y = class_grid_inputs(5, [7, 2, 4], per_class=3, seed=1)
    assert z.shape == (9, 5) and y.dtype == torch.int64
    assert y.tolist() == [7, 7, 7, 2, 2, 2, 4, 4, 4]
    rows = z.view(3, 3, 5)
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2]), "column j: one latent in every row"
    assert len({tuple(v.tolist()) for v in rows[0]}) == 3, "a fresh latent per column"
    assert torch.equal(rows[0], torch.randn(3, 5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(class_grid_inputs(5, [7], per_class=3, seed=1)[0], rows[0]), "a row does not depend on others"


@pytest.mark.parametrize(("classes", "per_class"), [([], 3), ([1], 0)])
def test_class_grid_needs_classes_and_a_column(classes, per_class):
    with pytest.raises(ValueError, match="a class grid needs classes and per_class >= 1"):
        class_grid_inputs(5, classes, per_class, seed=0)


def test_a_per_class_grid_png_lays_each_class_on_its_own_row(tmp_path):
    # Class k's images are filled with level k: each grid row must hold one level only.
    classes, per_class, side, pad = [0, 1, 2], 4, 6, 2
    levels = torch.tensor([0.0, 0.5, 1.0])
    images = levels.repeat_interleave(per_class).view(-1, 1, 1, 1).expand(-1, 1, side, side)
    png = save_image_grid(images, tmp_path / "grid.png", nrow=per_class, value_range=(0.0, 1.0))
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (len(classes) * (side + pad) + pad, per_class * (side + pad) + pad)
    for row, level in enumerate(levels.tolist()):
        top = pad + row * (side + pad)
        cells = [pixels[top:top + side, pad + c * (side + pad):pad + c * (side + pad) + side] for c in range(per_class)]
        assert all((cell == round(level * 255)).all() for cell in cells), f"row {row} is class {row} only"


def test_model_range_and_unit_range_grids_are_the_same_picture(tmp_path):
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    unit = save_image_grid(x, tmp_path / "unit.png", value_range=(0.0, 1.0))
    model = save_image_grid(x * 2 - 1, tmp_path / "model.png")
    assert np.abs(np.asarray(Image.open(unit)).astype(int) - np.asarray(Image.open(model)).astype(int)).max() <= 1


def test_loss_curves_plot_whatever_losses_the_family_reports(tmp_path):
    """A VAE reports loss/vae and loss/kl, no loss/d or D outputs: its curves must show them, not empty GAN axes."""
    history = [{"progress/kimg": k, "loss/vae": 200.0 / (k + 1), "loss/kl": 5.0 + k} for k in range(5)]
    empty = [{"progress/kimg": k} for k in range(5)]
    drawn = np.asarray(Image.open(save_loss_curves(history, tmp_path / "vae.png")).convert("L"))
    blank = np.asarray(Image.open(save_loss_curves(empty, tmp_path / "none.png")).convert("L"))
    assert drawn.shape[1] < 600 and blank.shape[1] < 600, "one panel (500 px): no D(x) panel without d/real"
    assert (drawn < 128).sum() > (blank < 128).sum() + 200, "the two series are drawn"
