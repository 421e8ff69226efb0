"""The evaluator: accuracy targets on MNIST and digits, real vs noise scores, ids, save/load, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gan.config import DataConfig
from gan.data import prepare, read_split, to_model_range
from gan.metrics import (
    Evaluator,
    evaluate_images,
    evaluator_id,
    evaluator_meta,
    load_evaluator,
    real_floor,
    save_evaluator,
    train_evaluator,
)
from tests.conftest import MNIST_IDX

N = 2000


def split(cfg: DataConfig, out_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ds = prepare(cfg, out_dir)
    return (*read_split(ds, "train"), *read_split(ds, "test"))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> tuple[Evaluator, float, np.ndarray, np.ndarray]:
    """One evaluator trained on the 8k/2k split of real MNIST, shared by the tests below."""
    if not (MNIST_IDX / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_IDX}")
    x_train, y_train, x_test, y_test = split(DataConfig(source="idx", root=str(MNIST_IDX)),
                                             tmp_path_factory.mktemp("data"))
    assert x_train.shape == (8000, 1, 28, 28) and x_test.shape == (2000, 1, 28, 28)
    model, acc = train_evaluator(x_train, y_train, x_test, y_test, seed=0)
    return model, acc, x_train, x_test


def test_mnist_evaluator_reaches_98_5_percent(mnist):
    model, acc, _, _ = mnist
    print(f"MNIST evaluator test accuracy: {acc:.4f}")
    assert acc >= 0.985
    assert not model.training


def test_held_out_digits_score_near_the_floor_and_noise_far_from_it(mnist):
    model, _, x_train, x_test = mnist
    held = to_model_range(x_test)
    offset = [0]

    def held_out(n: int, gen: torch.Generator) -> torch.Tensor:
        offset[0] += n
        return held[offset[0] - n:offset[0]]

    tag = "2k"
    # Different real subsets from the floor's, so "near" is a measurement, not an identity.
    real = evaluate_images(held_out, x_train, model, num_samples=N, seed=100)
    noise = evaluate_images(lambda n, g: torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, x_train, model,
                            num_samples=N, seed=100)
    floor = real_floor(x_train, x_test, model, num_samples=N, seed=0)
    print({k: round(v, 4) for k, v in {**real, **floor, **{f"noise {k}": v for k, v in noise.items()}}.items()})
    assert real[f"eval/is_{tag}"] > 9.0
    assert floor[f"eval/is_real_{tag}"] > 9.0
    assert real[f"eval/fid_{tag}"] < 1.5 * floor[f"eval/fid_floor_{tag}"]
    assert real[f"eval/precision_{tag}"] > 0.8 and real[f"eval/recall_{tag}"] > 0.8
    assert noise[f"eval/fid_{tag}"] > 100 * floor[f"eval/fid_floor_{tag}"]
    assert noise[f"eval/is_{tag}"] < 2.0
    assert noise[f"eval/kid_{tag}"] > 100 * abs(floor[f"eval/kid_floor_{tag}"])
    assert noise[f"eval/precision_{tag}"] < 0.05 and noise[f"eval/recall_{tag}"] < 0.05


@pytest.mark.parametrize("resolution", [16, 28])
def test_digits_evaluator_reaches_95_percent(resolution, tmp_path):
    x_train, y_train, x_test, y_test = split(DataConfig(source="digits", resolution=resolution), tmp_path)
    model, acc = train_evaluator(x_train, y_train, x_test, y_test, seed=0)
    print(f"digits {resolution}px evaluator test accuracy: {acc:.4f}")
    assert acc >= 0.95
    assert model.input_shape == (1, resolution, resolution) and model.num_classes == 10


def small_set(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, 16, 16), generator=gen, dtype=torch.uint8)
    x[torch.arange(n), 0, 4 * y, :] = 255  # class c: a bright row at 4c
    return x.numpy(), y.numpy()


def test_training_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    x, y = small_set()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    a, acc_a = train_evaluator(x, y, x[:64], y[:64], epochs=1, batch_size=64, seed=1, width=4)
    assert torch.equal(torch.rand(3), expected)
    b, acc_b = train_evaluator(x, y, x[:64], y[:64], epochs=1, batch_size=64, seed=1, width=4)
    c, _ = train_evaluator(x, y, x[:64], y[:64], epochs=1, batch_size=64, seed=2, width=4)
    assert evaluator_id(a) == evaluator_id(b) and acc_a == acc_b
    assert evaluator_id(a) != evaluator_id(c)


def test_evaluator_id_follows_the_weights():
    torch.manual_seed(0)
    a = Evaluator(in_channels=3, resolution=32, num_classes=10)
    b = Evaluator(in_channels=3, resolution=32, num_classes=10)
    b.load_state_dict(a.state_dict())
    assert evaluator_id(a) == evaluator_id(b) and len(evaluator_id(a)) == 16
    with torch.no_grad():
        b.classifier.bias[0] += 1e-6
    assert evaluator_id(a) != evaluator_id(b)


def test_save_and_load_round_trip_with_meta(tmp_path: Path):
    torch.manual_seed(0)
    model = Evaluator(in_channels=1, resolution=64, num_classes=7, feature_dim=32, width=8).eval()
    save_evaluator(model, tmp_path, {"test_accuracy": 0.5, "dataset_hash": "abc"})
    loaded = load_evaluator(tmp_path)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    assert evaluator_id(loaded) == evaluator_id(model) == evaluator_meta(tmp_path)["evaluator_id"]
    assert torch.equal(loaded.features(x), model.features(x)) and loaded.features(x).shape == (3, 32)
    assert evaluator_meta(tmp_path)["meta"] == {"test_accuracy": 0.5, "dataset_hash": "abc"}
    assert not loaded.training and loaded.input_shape == (1, 64, 64)

    state = torch.load(tmp_path / "evaluator.pt", weights_only=True)
    state["classifier.bias"] += 1.0
    torch.save(state, tmp_path / "evaluator.pt")
    with pytest.raises(ValueError, match="records"):
        load_evaluator(tmp_path)
    with pytest.raises(FileNotFoundError, match="no evaluator"):
        load_evaluator(tmp_path / "absent")


def test_evaluator_rejects_wrong_shapes_and_missing_labels():
    model = Evaluator(in_channels=1, resolution=28, num_classes=10)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    x, y = small_set()
    y[0] = -1
    with pytest.raises(ValueError, match="unlabelled"):
        train_evaluator(x, y, x, y, epochs=1)
