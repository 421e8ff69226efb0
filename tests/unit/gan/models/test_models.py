"""Network families: shapes, reference layouts, heads' closed forms, gradients to every parameter, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gan.config import LOSSES, ModelConfig
from gan.models import MODELS, DiscriminatorHead, GeneratorInput, build_models, realness_logit, register_model
from gan.models.heads import CODE_EMBED_DIM

K = 10
B = 4
MODES = ("plain", "conditional", "semi_supervised")


def make(family: str = "mlp", data_shape: tuple[int, ...] = (2,), *, loss_kind: str = "bce",
         num_classes: int = K, mode: str = "plain", **kw) -> tuple[nn.Module, nn.Module]:
    flags = {"conditional": mode == "conditional", "semi_supervised": mode == "semi_supervised"}
    if family in ("dcgan", "resnet"):
        kw = {"g_width": 8, "d_width": 8, **kw}
    model = ModelConfig(family=family, **flags, **kw)
    torch.manual_seed(0)  # the weights' draws must not depend on which tests ran before
    return build_models(model, loss_kind=loss_kind, data_shape=data_shape, num_classes=num_classes)


def latents(n: int = B, z_dim: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g), torch.randint(0, K, (n,), generator=g)


def linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def conv_sizes(module: nn.Module) -> list[tuple[int, int]]:
    kinds = (nn.Conv2d, nn.ConvTranspose2d)
    return [(m.in_channels, m.out_channels) for m in module.modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("data_shape", [(2,), (1, 28, 28)])
def test_mlp_shapes_and_range(data_shape):
    G, D = make("mlp", data_shape)
    z, _ = latents()
    x = G(z)
    assert G.z_dim == 100
    assert x.shape == (B, *data_shape)
    assert x.abs().max() <= 1
    assert D(x).shape == (B,)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [28, 32, 64])
def test_dcgan_shapes_and_range(resolution, channels):
    G, D = make("dcgan", (channels, resolution, resolution))
    z, _ = latents()
    x = G(z)
    assert x.shape == (B, channels, resolution, resolution)
    assert x.abs().max() <= 1
    assert D(x).shape == (B,)


def test_reference_mlp_2d_layout():
    G, D = make("mlp", (2,), hidden=(256,))
    assert linear_sizes(G) == [(100, 256), (256, 2)]
    assert linear_sizes(D) == [(2, 256), (256, 1)]
    assert sum(p.numel() for p in G.parameters()) == 100 * 256 + 256 + 256 * 2 + 2


def test_reference_mlp_mnist_layout():
    G, D = make("mlp", (1, 28, 28), hidden=(256, 512, 1024))
    assert linear_sizes(G) == [(100, 256), (256, 512), (512, 1024), (1024, 784)]
    assert linear_sizes(D) == [(784, 1024), (1024, 512), (512, 256), (256, 1)]
    acts = [m for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.2 for a in acts)
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())


@pytest.mark.parametrize("resolution,stages,s0", [(28, 2, 7), (32, 3, 4), (64, 4, 4)])
def test_dcgan_widths(resolution, stages, s0):
    g, d = 16, 8
    G, D = make("dcgan", (3, resolution, resolution), g_width=g, d_width=d)
    c0 = g * 2 ** (stages - 1)
    assert linear_sizes(G) == [(100, c0 * s0 * s0)]
    assert conv_sizes(G) == [(c0 >> i, c0 >> (i + 1)) for i in range(stages - 1)] + [(g, 3)]
    assert conv_sizes(D) == [(3, d)] + [(d << i, d << (i + 1)) for i in range(stages - 1)]
    assert linear_sizes(D) == [((d << (stages - 1)) * s0 * s0, 1)]



@pytest.mark.parametrize("resolution,stages,s0", [(28, 2, 7), (64, 4, 4)])
def test_dcgan_d_extra_convs_keep_channels_and_resolution(resolution, stages, s0):
    d = 8
    _, D = make("dcgan", (1, resolution, resolution), d_width=d, d_convs_per_stage=3)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    # Per stage: the 4x4 stride-2 conv, then two 3x3 stride-1 convs at its output width.
    expected = []
    for i in range(stages):
        c_in, c = (1 if i == 0 else d << (i - 1)), d << i
        expected += [(c_in, c, 4, 2), (c, c, 3, 1), (c, c, 3, 1)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == expected
    assert linear_sizes(D) == [((d << (stages - 1)) * s0 * s0, 1)]
    norms = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 * stages - 1  # every conv but the very first
    x = torch.randn(B, 1, resolution, resolution)
    assert D(x).shape == (B,)

def test_dcgan_init():
    torch.manual_seed(0)
    G, D = make("dcgan", (3, 64, 64), g_width=64, d_width=64)
    w = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 5e-3 and abs(bn.std().item() - 0.02) < 5e-3
    assert all((m.bias == 0).all() for m in G.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("resolution,stages", [(28, 2), (32, 3), (64, 4)])
def test_batchnorm_in_d_unless_wgan_gp(resolution, stages):
    for loss_kind in LOSSES:
        _, D = make("dcgan", (1, resolution, resolution), loss_kind=loss_kind)
        norms = [m for m in D.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        assert len(norms) == (0 if loss_kind == "wgan-gp" else stages - 1), loss_kind
        first = next(m for m in D.modules() if isinstance(m, nn.Conv2d))
        assert first.bias is not None


@pytest.mark.parametrize("family,data_shape", [("mlp", (1, 28, 28)), ("dcgan", (3, 32, 32))])
@pytest.mark.parametrize("mode", MODES)
def test_spectral_norm_on_every_d_layer(family, data_shape, mode):
    G, D = make(family, data_shape, mode=mode, spectral_norm=True)
    layers = [m for m in D.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(parametrize.is_parametrized(m) for m in G.modules())
    for m in layers:  # sigma(W) = 1 up to the power iteration's accuracy
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1, abs=0.05)
    _, D_plain = make(family, data_shape, mode=mode)
    assert not any(parametrize.is_parametrized(m) for m in D_plain.modules())


@pytest.mark.parametrize("family,data_shape", [("mlp", (1, 28, 28)), ("dcgan", (1, 28, 28))])
def test_conditional_outputs_depend_on_y(family, data_shape):
    G, D = make(family, data_shape, mode="conditional")
    G.eval(), D.eval()
    z, _ = latents()
    y0, y1 = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    with torch.no_grad():
        x0, x1 = G(z, y0), G(z, y1)
        assert (x0 - x1).abs().max() > 1e-4
        assert (D(x0, y0) - D(x0, y1)).abs().min() > 1e-6
    with pytest.raises(ValueError, match="labels"):
        G(z)
    with pytest.raises(ValueError, match="labels"):
        D(x0)


def test_unconditional_ignores_y():
    G, D = make("mlp", (2,))
    z, y = latents()
    x = G(z)
    assert torch.equal(G(z, y), x) and torch.equal(D(x, y), D(x))


def test_latent_codes_are_equal_normal_cdf_bins():
    codes = 5
    inp = GeneratorInput(3, latent_codes=codes)
    centres = torch.special.ndtri((torch.arange(codes) + 0.5) / codes)
    edges = torch.tensor([-40.0, 40.0])
    z = torch.zeros(codes + 2, 3)
    z[:, 0] = torch.cat([centres, edges])
    assert inp.code_of(z).tolist() == [*range(codes), 0, codes - 1]
    n = 200_000
    counts = torch.bincount(inp.code_of(torch.randn(n, 3, generator=torch.Generator().manual_seed(0))),
                            minlength=codes).double()
    p = 1 / codes
    assert (counts - n * p).abs().max() < 5 * math.sqrt(n * p * (1 - p))


def test_latent_code_replaces_the_first_coordinate():
    inp = GeneratorInput(4, latent_codes=6)
    z, _ = latents(z_dim=4)
    out = inp(z)
    assert inp.out_features == 3 + CODE_EMBED_DIM == out.shape[1]
    assert torch.equal(out[:, :3], z[:, 1:])
    assert torch.equal(out[:, 3:], inp.codes.weight[inp.code_of(z)])
    conditional = GeneratorInput(4, K, latent_codes=6)
    _, y = latents(z_dim=4)
    assert conditional(z, y).shape == (B, conditional.out_features) == (B, 3 + CODE_EMBED_DIM + 4)
    with pytest.raises(ValueError, match="z_dim must be >= 2"):
        GeneratorInput(1, latent_codes=6)


@pytest.mark.parametrize("family,data_shape", [("mlp", (2,)), ("dcgan", (1, 28, 28))])
def test_g_with_latent_codes_is_piecewise_constant_in_the_first_coordinate(family, data_shape):
    G, _ = make(family, data_shape, z_dim=3, latent_codes=4)
    G.eval()
    z, _ = latents(z_dim=3)
    same_bin, next_bin = z.clone(), z.clone()
    z[:, 0], same_bin[:, 0], next_bin[:, 0] = 0.05, 0.6, -0.05  # bins of 4: edges at 0 and +-0.674
    with torch.no_grad():
        x = G(z)
        assert x.shape == (B, *data_shape)
        assert torch.equal(G(same_bin), x)
        assert (G(next_bin) - x).abs().amax() > 1e-4
    (g_embed_grad,) = torch.autograd.grad(G(z).sum(), G.input.codes.weight)
    assert g_embed_grad[2].abs().sum() > 0 and g_embed_grad[[0, 1, 3]].abs().sum() == 0


def test_projection_head_closed_form():
    torch.manual_seed(0)
    head = DiscriminatorHead(6, 3, conditional=True)
    h = torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 1, 0])
    expected = h @ head.linear.weight[0] + head.linear.bias + (head.embed.weight[y] * h).sum(1)
    torch.testing.assert_close(head(h, y), expected)


def test_semi_supervised_d_output():
    G, D = make("dcgan", (1, 28, 28), mode="semi_supervised")
    z, y = latents()
    out = D(G(z, y), y)
    assert out.shape == (B, K + 1)
    assert realness_logit(out).shape == (B,)


def test_realness_logit_closed_form():
    assert realness_logit(torch.zeros(2, K + 1)).tolist() == pytest.approx([math.log(K)] * 2)
    out = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0], [-1.0, 4.0, 2.0, 5.0]])
    hand = [math.log(math.e + math.e ** 2 + math.e ** 3) - 0.5, math.log(3.0),
            math.log(math.e ** -1 + math.e ** 4 + math.e ** 2) - 5.0]
    assert realness_logit(out).tolist() == pytest.approx(hand, rel=1e-6)
    # sigmoid(realness) = 1 - p(fake | x) under the (K+1)-way softmax
    torch.testing.assert_close(torch.sigmoid(realness_logit(out)), 1 - out.softmax(1)[:, -1])
    plain = torch.randn(7)
    assert realness_logit(plain) is plain
    with pytest.raises(ValueError, match="shape"):
        realness_logit(torch.zeros(3, 1))


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("loss_kind", LOSSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,data_shape", [("mlp", (2,)), ("mlp", (1, 28, 28)), ("dcgan", (1, 28, 28)),
                                               ("dcgan", (3, 32, 32)), ("dcgan", (3, 64, 64)), ("resnet", (1, 28, 28)),
                                               ("resnet", (3, 32, 32))])
def test_every_parameter_gets_a_gradient(family, data_shape, mode, loss_kind, spectral_norm):
    G, D = make(family, data_shape, mode=mode, loss_kind=loss_kind, spectral_norm=spectral_norm)
    z, y = latents()
    realness_logit(D(G(z, y), y)).sum().backward()
    for net, name in ((G, "G"), (D, "D")):
        for pname, p in net.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


def test_errors_name_the_key():
    model = ModelConfig()
    object.__setattr__(model, "family", "resnet")  # ModelConfig itself rejects it; build_models must too
    with pytest.raises(ValueError, match="model.family.*resnet"):
        build_models(model, loss_kind="bce", data_shape=(2,), num_classes=0)
    with pytest.raises(ValueError, match="data.resolution"):
        make("dcgan", (1, 16, 16))
    with pytest.raises(ValueError, match="data.resolution"):
        make("dcgan", (1, 28, 32))
    with pytest.raises(ValueError, match="data.channels"):
        make("dcgan", (2, 28, 28))
    with pytest.raises(ValueError, match="model.family"):
        make("dcgan", (2,))
    with pytest.raises(ValueError, match="model.conditional"):
        make("mlp", (1, 28, 28), mode="conditional", num_classes=0)
    with pytest.raises(ValueError, match="model.semi_supervised"):
        make("dcgan", (1, 28, 28), mode="semi_supervised", num_classes=1)
    with pytest.raises(ValueError, match="loss.kind"):
        make("mlp", (2,), loss_kind="wgan")


def test_register_model():
    assert set(MODELS) >= {"mlp", "dcgan"}
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda *a, **k: None)

    @register_model("tiny")
    def build(model, *, loss_kind, data_shape, num_classes):
        return nn.Identity(), nn.Identity()

    try:
        model = ModelConfig()
        object.__setattr__(model, "family", "tiny")
        G, D = build_models(model, loss_kind="bce", data_shape=(2,), num_classes=0)
        assert isinstance(G, nn.Identity)
    finally:
        del MODELS["tiny"]


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = make("dcgan", (1, 28, 28), spectral_norm=True)
    torch.manual_seed(3)
    b = make("dcgan", (1, 28, 28), spectral_norm=True)
    for net_a, net_b in zip(a, b, strict=True):
        sa, sb = net_a.state_dict(), net_b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_frozen_config_replace_still_builds():
    model = dataclasses.replace(ModelConfig(), hidden=(32, 64))
    G, D = build_models(model, loss_kind="hinge", data_shape=(1, 28, 28), num_classes=0)
    assert linear_sizes(G)[-1] == (64, 784) and linear_sizes(D)[0] == (784, 64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,data_shape", [("mlp", (1, 28, 28)), ("dcgan", (3, 32, 32))])
def test_d_supports_two_forwards_and_a_gradient_penalty(family, data_shape, mode):
    # The D step runs D on real and fake before one backward, and wgan-gp differentiates through dD/dx.
    G, D = make(family, data_shape, mode=mode, loss_kind="wgan-gp", spectral_norm=True)
    z, y = latents()
    real = torch.rand(B, *data_shape) * 2 - 1
    fake = G(z, y).detach()
    x = torch.lerp(real, fake, torch.rand(B, *[1] * len(data_shape))).requires_grad_(True)
    (grad,) = torch.autograd.grad(realness_logit(D(x, y)).sum(), x, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = realness_logit(D(fake, y)).mean() - realness_logit(D(real, y)).mean() + 10 * penalty
    loss.backward()
    grads = [p.grad for p in D.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
