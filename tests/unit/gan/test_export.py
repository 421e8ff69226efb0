"""The registered form of a generator (latents in, images in [0, 1] or 2-D points in data units out), of an
autoencoder's encoder (images in [0, 1] in, codes out) and of a semi-supervised GAN's classifier (class logits out)."""

import numpy as np
import pytest
import torch

from gan.config import ModelConfig
from gan.export import ModelRangeView, PixelRangeView, ServedClassifier, ServedEncoder, served_generator
from gan.models import build_models
from gan.rendering import generate


def _served(conditional: bool, points: bool = False):
    if points:
        G, _ = build_models(ModelConfig(family="mlp", z_dim=4, hidden=(16,)), loss_kind="bce", data_shape=(2,),
                            num_classes=0)
        return G, served_generator(G, z_dim=4, points=True, scale=1.5, conditional=False, num_classes=0)
    model = ModelConfig(family="dcgan", z_dim=8, g_width=4, d_width=4, conditional=conditional)
    G, _ = build_models(model, loss_kind="bce", data_shape=(1, 28, 28), num_classes=10)
    return G, served_generator(G, z_dim=8, points=False, scale=1.0, conditional=conditional, num_classes=10)


def test_images_come_out_in_unit_range_as_an_affine_map_of_G():
    G, served = _served(conditional=False)
    (z,) = served.example_inputs(batch=3)
    out = served(torch.from_numpy(z))
    with torch.no_grad():
        raw = G.eval()(torch.from_numpy(z))
    assert out.shape == (3, 1, 28, 28)
    assert 0.0 <= out.min() and out.max() <= 1.0
    torch.testing.assert_close(out, (raw + 1) / 2)


def test_points_are_scaled_back_to_data_units():
    G, served = _served(conditional=False, points=True)
    (z,) = served.example_inputs()
    with torch.no_grad():
        torch.testing.assert_close(served(torch.from_numpy(z)), G.eval()(torch.from_numpy(z)) * 1.5)


def test_conditional_example_cycles_through_the_classes():
    _, served = _served(conditional=True)
    z, y = served.example_inputs(batch=12)
    assert z.shape == (12, 8) and z.dtype == np.float32
    assert y.tolist() == [i % 10 for i in range(12)] and y.dtype == np.int64
    assert served(torch.from_numpy(z), torch.from_numpy(y)).shape == (12, 1, 28, 28)


def test_the_example_has_a_batch_of_at_least_two_for_a_dynamic_batch_dimension():
    _, served = _served(conditional=False)
    assert served.example_inputs(batch=1)[0].shape[0] == 2


@pytest.mark.parametrize("conditional", [False, True])
def test_torch_export_keeps_the_batch_dimension_dynamic(conditional):
    _, served = _served(conditional=conditional)
    inputs = tuple(torch.from_numpy(x) for x in served.example_inputs(batch=4))
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in inputs)
    exported = torch.export.export(served, inputs, dynamic_shapes=shapes).module()
    z = torch.randn(7, 8)
    extra = (torch.arange(7) % 10,) if conditional else ()
    torch.testing.assert_close(exported(z, *extra), served(z, *extra))


@pytest.mark.parametrize("points", [False, True])
def test_the_model_range_view_of_a_served_generator_is_g_again(points):
    G, served = _served(conditional=False, points=points)
    (z,) = served.example_inputs(batch=5)
    z = torch.from_numpy(z)
    with torch.no_grad():
        expected = G.eval()(z) * (1.5 if points else 1.0)
        torch.testing.assert_close(ModelRangeView(served, points=points)(z), expected)


def test_the_view_scores_an_exported_module_which_refuses_train_and_eval():
    _, served = _served(conditional=False)
    inputs = tuple(torch.from_numpy(x) for x in served.example_inputs())
    exported = torch.export.export(served, inputs, dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    view = ModelRangeView(exported, points=False)
    z = torch.randn(3, 8)
    torch.testing.assert_close(generate(view, z), served(z) * 2 - 1)


def test_an_encoder_and_a_classifier_take_images_in_unit_range():
    torch.manual_seed(0)
    decoder, encoder = build_models(ModelConfig(family="vae", z_dim=4), loss_kind="bce", data_shape=(1, 8, 8),
                                    num_classes=0)
    served = ServedEncoder(encoder, data_shape=(1, 8, 8), z_dim=4)
    (x,) = served.example_inputs(batch=3)
    x = torch.from_numpy(x)
    assert x.shape == (3, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    mu, _ = encoder(x * 2 - 1)
    torch.testing.assert_close(served(x), mu)  # a VAE's code is its posterior mean
    torch.testing.assert_close(PixelRangeView(served)(x * 2 - 1), mu)  # seen again as a model-range network
    _, D = build_models(ModelConfig(family="dcgan", g_width=4, d_width=4, semi_supervised=True), loss_kind="bce",
                        data_shape=(1, 28, 28), num_classes=10)
    classifier = ServedClassifier(D, data_shape=(1, 28, 28), num_classes=10)
    images = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(classifier(images), D(images * 2 - 1)[:, :10])  # the fake logit dropped
