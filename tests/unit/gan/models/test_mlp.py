"""The reference MNIST MLP (100-256-512-1024-784) learns on real MNIST digits from ../shared/data."""

import torch

from gan.config import DataConfig
from gan.config_loader import load_config
from gan.data import prepare, read_split, to_model_range
from gan.data.reader import load_manifest
from gan.loop import DataSpec, fit


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
