"""The reference MNIST MLP (100-256-512-1024-784) learns on real MNIST digits from ../shared/data; D's options for
Salimans et al. 2016's semi-supervised D (Gaussian noise on every layer's input, weight normalisation)."""

import pytest
import torch
from torch.nn.utils import parametrize

from gan.config import ConfigError, DataConfig, ModelConfig
from gan.config_loader import load_config
from gan.data import prepare, read_split, to_model_range
from gan.data.reader import load_manifest
from gan.loop import DataSpec, fit
from gan.models import build_models


def d_accuracy(D, G, real: torch.Tensor, z_dim: int) -> float:
    """Share of real test digits D calls real plus fakes it calls fake, halved: 0.5 is chance."""
    with torch.no_grad():
        fake = G(torch.randn(real.shape[0], z_dim, generator=torch.Generator().manual_seed(3)))
        return 0.5 * ((D(real) > 0).float().mean() + (D(fake) < 0).float().mean()).item()


def test_reference_mlp_discriminator_leaves_chance_within_300_steps(mnist_idx, tmp_path):
    ds = prepare(DataConfig(source="idx", root=str(mnist_idx)), tmp_path)
    manifest = load_manifest(ds)
    x_train, _ = read_split(manifest, "train")
    x_test, _ = read_split(manifest, "test")
    assert x_train.shape == (8000, 1, 28, 28) and x_test.shape == (2000, 1, 28, 28)
    train = to_model_range(x_train)

    def batches(epoch: int):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(train) // 64):
            yield train[order[i * 64:(i + 1) * 64]], None

    cfg = load_config(None, ["model.hidden=[256, 512, 1024]", "train.batch_size=64", "train.kimg=19.2",
                             "train.log_every_kimg=5", "train.checkpoint_every_kimg=100", "optim.ema=false"])
    spec = DataSpec.from_manifest(manifest)
    history = []
    state = fit(cfg, batches, spec=spec, report=lambda m, c: history.append(m))
    assert state.d_steps == 300
    real = to_model_range(x_test[:1000])
    acc = d_accuracy(state.D, state.G, real, cfg.model.z_dim)
    print(f"D accuracy after 300 steps: {acc:.3f}")
    assert acc > 0.65, f"D accuracy {acc:.3f} is still near chance"
    assert history[-1]["d/real"] > history[-1]["d/fake"] + 0.1


def salimans_d(hidden=(16, 32), **kw):
    model = ModelConfig(hidden=hidden, semi_supervised=True, **kw)
    return build_models(model, loss_kind="bce", data_shape=(1, 8, 8), num_classes=10)[1]


def test_d_noise_is_on_in_training_only_and_its_features_come_before_it():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    noisy, quiet = salimans_d(d_input_noise=0.6, d_hidden_noise=0.5), salimans_d()
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy(x))
    noisy.train()
    assert not torch.equal(noisy(x), noisy(x))
    torch.testing.assert_close(quiet(x), quiet(x))  # no noise: training mode is deterministic too
    only_hidden = salimans_d((16,), d_hidden_noise=0.5).train()  # one hidden layer: noise only before the head
    (out_a, h_a), (out_b, h_b) = only_hidden(x, features=True), only_hidden(x, features=True)
    torch.testing.assert_close(h_a, h_b)  # the last hidden layer's features are taken before the head's noise
    assert not torch.equal(out_a, out_b)
    assert out_a.shape == (5, 11) and h_a.shape == (5, 16)


def test_d_weight_norm_reparametrises_every_linear_as_g_v_over_its_norm():
    D = salimans_d(d_weight_norm=True)
    linears = [m for m in D.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(parametrize.is_parametrized(m, "weight") for m in linears)
    first = linears[0]
    g, v = first.parametrizations.weight.original0, first.parametrizations.weight.original1
    torch.testing.assert_close(first.weight, g * v / v.norm(dim=1, keepdim=True))
    before = first.weight.detach().clone()
    with torch.no_grad():
        v.mul_(3.0)  # the direction's scale is irrelevant, g alone sets each row's norm
    torch.testing.assert_close(first.weight, before)
    torch.testing.assert_close(first.weight.norm(dim=1), g.abs().squeeze(1))


@pytest.mark.parametrize("overrides, message", [
    (["model.d_input_noise=-0.1"], "model.d_input_noise must be >= 0"),
    (["model.d_hidden_noise=-1"], "model.d_hidden_noise must be >= 0"),
    (["model.d_weight_norm=true", "model.spectral_norm=true"], "model.d_weight_norm cannot be combined"),
    (["data.source=digits", "model.family=dcgan", "model.d_input_noise=0.3"], "model.d_input_noise is for the mlp"),
    (["data.source=digits", "model.family=resnet", "model.d_weight_norm=true"], "model.d_weight_norm is for the mlp"),
])
def test_bad_d_options_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
