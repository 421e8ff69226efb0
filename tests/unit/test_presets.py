"""Every preset in configs/ builds into a valid Config."""

from pathlib import Path

import pytest

from gan.config import load_config

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert {p.stem for p in PRESETS} >= {"quickstart", "ring8", "grid25", "mnist-mlp", "mnist-dcgan"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_builds(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.train.batch_size % cfg.scale.num_workers == 0
