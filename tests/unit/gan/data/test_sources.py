"""gan/data/sources.py against torchvision: where ours matches the library's helpers, and where it uses them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from gan.config import DataConfig
from gan.data.sources import IMAGE_SUFFIXES, _folder_files, _resize, load_source, read_idx

IMAGES = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
LABELS = np.array([7, 3], np.uint8)


def idx_bytes(type_byte: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return bytes([0, 0, type_byte, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_decodes_hand_written_images_and_labels(tmp_path: Path, suffix: str) -> None:
    files = {"images": idx_bytes(0x08, (2, 3, 4), IMAGES.tobytes()), "labels": idx_bytes(0x08, (2,), LABELS.tobytes())}
    for name, raw in files.items():
        (tmp_path / (name + suffix)).write_bytes(gzip.compress(raw) if suffix else raw)
    x, y = read_idx(tmp_path / f"images{suffix}"), read_idx(tmp_path / f"labels{suffix}")
    assert x.dtype == np.uint8 and np.array_equal(x, np.frombuffer(files["images"][16:], np.uint8).reshape(2, 3, 4))
    assert y.dtype == np.uint8 and np.array_equal(y, np.frombuffer(files["labels"][8:], np.uint8))
    assert np.array_equal(x, IMAGES) and np.array_equal(y, LABELS)


@pytest.mark.parametrize("type_byte, dtype", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"),
                                              (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_matches_torchvision_reader_on_plain_files(tmp_path: Path, type_byte: int, dtype: str) -> None:
    values = np.array([[0, 1, -2], [3, 100, -128]]).astype(dtype)
    path = tmp_path / "data-idx2"
    path.write_bytes(idx_bytes(type_byte, values.shape, values.tobytes()))
    ours = read_idx(path)
    assert np.array_equal(ours, read_sn3_pascalvincent_tensor(str(path)).numpy()) and np.array_equal(ours, values)


def test_class_folders_are_labelled_as_torchvision_finds_classes(tmp_path: Path) -> None:
    for name in ["dog", "Zebra", "10", "2", "cat"]:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (4, 4), i).save(tmp_path / name / f"{name}{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    files, labels = _folder_files(tmp_path)
    classes, class_to_idx = find_classes(tmp_path)
    assert [class_to_idx[p.parent.name] for p in files] == labels
    assert sorted(set(labels)) == list(range(len(classes)))
    expected = make_dataset(tmp_path, class_to_idx, extensions=IMAGE_SUFFIXES)
    assert [(str(p), label) for p, label in zip(files, labels)] == expected


def interpolate_and_round(x: np.ndarray, size: int) -> np.ndarray:
    """The float32 antialiased bilinear resize, rounded to uint8, that `_resize` must reproduce bit for bit."""
    batch = F.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    return batch.round_().clamp_(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("size", [16, 28])
def test_resize_is_bit_identical_to_float_interpolation_on_digits(size: int) -> None:
    raw, resized = (load_source(DataConfig(source="digits", resolution=r)) for r in (8, size))
    assert np.array_equal(resized.x_train, interpolate_and_round(raw.x_train, size))
    assert np.array_equal(resized.x_test, interpolate_and_round(raw.x_test, size))


def test_resize_is_bit_identical_when_shrinking_colour_images() -> None:
    x = np.random.default_rng(0).integers(0, 256, (16, 3, 37, 37), dtype=np.uint8)
    for size in (8, 16, 28):
        assert np.array_equal(_resize(x, size, chunk=5), interpolate_and_round(x, size))
