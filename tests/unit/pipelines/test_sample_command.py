"""`sample`: argument checks before any work, --class against the model's classes, and the per-class grid it writes
(against a real SQLite MLflow store holding small untrained generators)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gan.config import ModelConfig
from gan.export import served_generator
from gan.models import build_models
from gan.rendering import class_grid_inputs
from pipelines.cli import main
from pipelines.sample_command import SampleRequestError, check_arguments, grid_classes, model_classes
from pipelines.tracking import Tracker

SHAPE, CLASSES = (1, 28, 28), 10


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, object]:
    """A store with a conditional and an unconditional DCGAN generator (untrained), and the served modules."""
    root = tmp_path_factory.mktemp("sample-store")
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    out: dict[str, object] = {"uri": tracker.tracking_uri}
    for conditional in (True, False):
        torch.manual_seed(0)
        model = ModelConfig(family="dcgan", z_dim=8, g_width=4, d_width=4, conditional=conditional)
        G, _ = build_models(model, loss_kind="bce", data_shape=SHAPE, num_classes=CLASSES)
        served = served_generator(G, z_dim=8, points=False, scale=1.0, conditional=conditional, num_classes=CLASSES)
        run_id = tracker.start_run("sample", "register")
        name = "conditional" if conditional else "plain"
        out[name] = tracker.log_generator(run_id, served, served.example_inputs(),
                                          metadata={"points": False, "num_classes": served.num_classes})
        out[f"{name}_module"] = served
    return out


def sample(store, model: str, tmp_path, *extra: str) -> int:
    return main(["sample", "--model", str(store[model]), "--out", str(tmp_path / "grid.png"), "--npy",
                 "--tracking-uri", str(store["uri"]), *extra])


@pytest.mark.parametrize(("num", "classes", "message"), [
    (0, None, "--num must be >= 1, got 0"),
    (None, [3, -1], "--class must be >= 0, got -1"),
])
def test_arguments_are_checked_before_the_store_is_touched(num, classes, message, tmp_path, capsys):
    with pytest.raises(SampleRequestError, match=message):
        check_arguments(num, classes)
    args = ["sample", "--model", "models:/nowhere@champion", "--out", str(tmp_path / "x.png"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'never.db'}"]
    args += ["-n", str(num)] if num is not None else []
    for k in classes or []:
        args += ["--class", str(k)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists(), "no store is opened for bad arguments"


def test_classes_are_checked_against_the_model():
    assert grid_classes(None, 10, "m") == list(range(10)), "every class by default"
    assert grid_classes([7, 2, 7], 10, "m") == [7, 2], "in the order given, once each"
    assert grid_classes(None, 0, "m") is None
    with pytest.raises(SampleRequestError, match=r"--class 10 is out of range: m has 10 classes \(0..9\)"):
        grid_classes([3, 10], 10, "m")
    with pytest.raises(SampleRequestError, match="--class needs a conditional generator; m is unconditional"):
        grid_classes([0], 0, "m")
    assert model_classes([(-1, 8)], {"num_classes": 0}, "m") == 0
    assert model_classes([(-1, 8), (-1,)], {"num_classes": 10}, "m") == 10
    with pytest.raises(SampleRequestError, match="takes class labels but its metadata records no num_classes"):
        model_classes([(-1, 8), (-1,)], {}, "m")


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("conditional", ["--class", "10"], "--class 10 is out of range"),
    ("plain", ["--class", "0"], "--class needs a conditional generator"),
])
def test_a_class_the_model_cannot_draw_exits_2_and_writes_nothing(store, model, extra, message, tmp_path, capsys):
    assert sample(store, model, tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_asked_classes_come_one_row_each_with_shared_latents_per_column(store, tmp_path):
    assert sample(store, "conditional", tmp_path, "--class", "3", "--class", "7", "-n", "5", "--seed", "2") == 0
    images, labels = np.load(tmp_path / "grid.npy"), np.load(tmp_path / "grid.labels.npy")
    assert images.shape == (10, *SHAPE) and images.dtype == np.uint8
    assert labels.tolist() == [3] * 5 + [7] * 5
    z, y = class_grid_inputs(8, [3, 7], 5, seed=2)
    with torch.no_grad():
        expected = store["conditional_module"](z, y)
    np.testing.assert_allclose(images, (expected * 255).round().numpy(), atol=1)
    pad = 2
    assert Image.open(tmp_path / "grid.png").size == (5 * (28 + pad) + pad, 2 * (28 + pad) + pad), "5 wide, 2 rows"


def test_a_conditional_model_draws_every_class_by_default_and_a_plain_one_a_square_grid(store, tmp_path):
    assert sample(store, "conditional", tmp_path) == 0
    assert np.load(tmp_path / "grid.labels.npy").tolist() == np.repeat(np.arange(CLASSES), 8).tolist()
    assert Image.open(tmp_path / "grid.png").size == (8 * 30 + 2, CLASSES * 30 + 2), "8 per class, a row per class"
    (tmp_path / "grid.labels.npy").unlink()
    assert sample(store, "plain", tmp_path, "-n", "9") == 0
    assert np.load(tmp_path / "grid.npy").shape == (9, *SHAPE) and not (tmp_path / "grid.labels.npy").exists()
    assert Image.open(tmp_path / "grid.png").size == (3 * 30 + 2, 3 * 30 + 2)
