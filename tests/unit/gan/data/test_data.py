"""Dataset layer: every offline source round-trips through Parquet, splits are fixed, corruption is caught."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gan.config import ConfigError, DataConfig
from gan.data import (
    MODE_SIGMA,
    DatasetError,
    decode,
    keep_labels,
    load_manifest,
    load_source,
    mode_centres,
    prepare,
    read_split,
    shard_paths,
    to_model_range,
    to_pixels,
    verify,
)
from gan.data.prepare import dataset_id
from gan.data.transforms import shift_and_zoom

REPO = Path(__file__).resolve().parents[4]
MNIST_T10K = Path(__file__).resolve().parents[5] / "shared" / "data" / "mnist-t10k"


def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Examples as a sorted multiset of (pixels + label) bytes, to compare data regardless of split order."""
    return sorted(xi.tobytes() + int(yi).to_bytes(8, "little") for xi, yi in zip(x, y))


def read_both(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (*read_split(path, "train"), *read_split(path, "test"))


def write_idx(path: Path, arr: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def test_pixels_round_trip_exactly_through_model_range() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    scaled = to_model_range(pixels)
    assert scaled.min() == -1 and scaled.max() == 1
    assert torch.equal(to_pixels(scaled), pixels)


def test_shift_and_zoom_moves_images_by_at_most_its_bounds_and_is_seeded() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 12:16, 12:16] = 1.0  # a centred square, so zooming about the centre leaves its centroid in place
    rows = torch.arange(28.0).view(1, 1, 28, 1)

    def centroid_rows(images: torch.Tensor) -> torch.Tensor:
        return (images * rows).sum((1, 2, 3)) / images.sum((1, 2, 3))

    assert torch.allclose(shift_and_zoom(x, torch.Generator().manual_seed(0), max_shift=0, max_zoom=0), x, atol=1e-6)
    moved = shift_and_zoom(x, torch.Generator().manual_seed(0), max_shift=2.0, max_zoom=0.1)
    shift = (centroid_rows(moved) - centroid_rows(x)).abs()
    assert shift.max() <= 2.0 + 1e-4 and shift.max() > 1.0, "shifts span up to 2 pixels"
    assert torch.equal(moved, shift_and_zoom(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(moved, shift_and_zoom(x, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="images"):
        shift_and_zoom(torch.zeros(4, 2), torch.Generator())


@pytest.mark.parametrize("source, modes, scale", [("ring8", 8, 1.5), ("grid25", 25, 5.0)])
def test_point_mixtures_round_trip_and_sit_on_their_modes(tmp_path: Path, source: str, modes: int,
                                                          scale: float) -> None:
    cfg = DataConfig(source=source, num_samples=3000, shard_rows=1000)
    path = prepare(cfg, tmp_path)
    m = load_manifest(path)
    x_tr, y_tr, x_te, y_te = read_both(path)
    assert (len(x_tr), len(x_te)) == (2400, 600) and x_tr.shape[1:] == (2,) and x_tr.dtype == np.float32
    assert (m.kind, m.shape, m.dtype, m.num_classes, m.scale) == ("points", (2,), "float32", modes, scale)
    assert m.labels == tuple(range(modes)) and len(shard_paths(m, "train")) == 3
    src = load_source(cfg)
    assert np.array_equal(x_tr, src.x_train) and np.array_equal(y_te, src.y_test)
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    offsets = x - mode_centres(source)[y]
    sigma = MODE_SIGMA[source]
    assert np.linalg.norm(offsets, axis=1).max() < 5 * sigma
    assert np.allclose(offsets.std(axis=0), sigma, rtol=0.1)
    counts = np.bincount(y, minlength=modes)
    expected = len(y) / modes
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    assert np.abs(x).max() / m.scale < 0.9  # inside G's tanh range with margin


@pytest.mark.parametrize("resolution", [8, 16, 28])
def test_digits_round_trip(tmp_path: Path, resolution: int) -> None:
    from sklearn.datasets import load_digits

    path = prepare(DataConfig(source="digits", resolution=resolution), tmp_path)
    m = load_manifest(path)
    x_tr, y_tr, x_te, y_te = read_both(path)
    assert (len(x_tr), len(x_te)) == (1438, 359)
    assert x_tr.shape[1:] == (1, resolution, resolution) and x_tr.dtype == np.uint8
    assert (m.kind, m.dtype, m.num_classes, m.labels) == ("image", "uint8", 10, tuple(range(10)))
    assert x_tr.max() == 255 and x_tr.min() == 0
    digits = load_digits()
    raw = np.rint(digits.images * 255 / 16).astype(np.uint8)
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    if resolution == 8:
        assert rows(x, y) == rows(raw[:, None], digits.target)
    else:  # bilinear resizing keeps each image's mean brightness (up to edge effects and rounding)
        assert abs(float(x.mean()) - float(raw.mean())) < 3


def test_channels_option_repeats_grey(tmp_path: Path) -> None:
    x, _ = read_split(prepare(DataConfig(source="digits", resolution=8, channels=3), tmp_path), "test")
    assert x.shape[1] == 3 and np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])


def test_idx_folder_single_pair_is_split_and_keeps_raw_bytes(tmp_path: Path) -> None:
    if not MNIST_T10K.is_dir():
        pytest.skip(f"shared MNIST t10k IDX files not found at {MNIST_T10K}")
    path = prepare(DataConfig(source="idx", root=str(MNIST_T10K), test_fraction=0.2), tmp_path)
    x_tr, y_tr, x_te, y_te = read_both(path)
    assert (len(x_tr), len(x_te)) == (8000, 2000) and x_tr.shape[1:] == (1, 28, 28)
    assert load_manifest(path).labels == tuple(range(10))
    with gzip.open(MNIST_T10K / "t10k-images-idx3-ubyte.gz") as f:
        raw_x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 1, 28, 28)
    with gzip.open(MNIST_T10K / "t10k-labels-idx1-ubyte.gz") as f:
        raw_y = np.frombuffer(f.read(), np.uint8, offset=8)
    assert rows(np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])) == rows(raw_x, raw_y)


def test_idx_folder_with_train_and_t10k_keeps_the_official_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (30, 8, 8)), rng.integers(0, 256, (10, 8, 8))
    y_train, y_test = rng.integers(0, 10, 30), rng.integers(0, 10, 10)
    root = tmp_path / "idx"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", x_train)
    write_idx(root / "train-labels-idx1-ubyte", y_train)
    write_idx(root / "t10k-images-idx3-ubyte.gz", x_test)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", y_test)
    x_tr, y_tr, x_te, y_te = read_both(prepare(DataConfig(source="idx", root=str(root), resolution=8), tmp_path))
    assert np.array_equal(x_tr[:, 0], x_train) and np.array_equal(y_tr, y_train)
    assert np.array_equal(x_te[:, 0], x_test) and np.array_equal(y_te, y_test)


def test_bad_idx_files_are_named(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    root.mkdir()
    with pytest.raises(DatasetError, match="no IDX images file"):
        load_source(DataConfig(source="idx", root=str(root)))
    images = root / "train-images-idx3-ubyte"
    write_idx(images, np.zeros((4, 8, 8)))
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(4))
    cfg = DataConfig(source="idx", root=str(root), resolution=8)
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: truncated"):
        load_source(cfg)
    images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: not an IDX file"):
        load_source(cfg)
    write_idx(images, np.zeros((5, 8, 8)))
    with pytest.raises(DatasetError, match="expected 5 non-negative integer labels"):
        load_source(cfg)


def make_images(folder: Path, colours: list[tuple[int, int, int]], mode: str = "RGB") -> None:
    folder.mkdir(parents=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (12, 10), colour).convert(mode).save(folder / f"img{i:02d}.png")


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}
    for name, colour in colours.items():
        make_images(tmp_path / "in" / name, [colour] * 5)
    cfg = DataConfig(source="folder", root=str(tmp_path / "in"), resolution=8)
    path = prepare(cfg, tmp_path / "out")
    m = load_manifest(path)
    x_tr, y_tr, x_te, y_te = read_both(path)
    assert (len(x_tr), len(x_te), m.num_classes, m.labels, m.shape) == (12, 3, 3, (0, 1, 2), (3, 8, 8))
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    for label, colour in enumerate(colours.values()):  # a flat colour stays exactly that colour when resized
        assert (y == label).sum() == 5 and np.all(x[y == label] == np.array(colour, np.uint8)[:, None, None])
    grey, _ = read_split(prepare(DataConfig(source="folder", root=str(tmp_path / "in"), resolution=8, channels=1),
                                 tmp_path / "out"), "train")
    luma = {int(np.asarray(Image.new("RGB", (1, 1), c).convert("L"))[0, 0]) for c in colours.values()}
    assert grey.shape[1:] == (1, 8, 8) and set(np.unique(grey)) == luma
    (tmp_path / "in" / "dog" / "img00.png").write_bytes((tmp_path / "in" / "cat" / "img00.png").read_bytes())
    assert prepare(cfg, tmp_path / "out") != path  # edited inputs give a new dataset id


def test_flat_image_folder_is_unlabelled(tmp_path: Path) -> None:
    make_images(tmp_path / "in", [(v, v, v) for v in range(0, 250, 25)], mode="L")
    path = prepare(DataConfig(source="folder", root=str(tmp_path / "in"), resolution=8), tmp_path / "out")
    m = load_manifest(path)
    x_tr, y_tr = read_split(path, "train")
    assert (m.num_classes, m.labels, m.shape, len(x_tr), y_tr) == (0, (), (1, 8, 8), 8, None)
    assert pq.read_table(shard_paths(m, "train")[0]).column("y").to_pylist() == [-1] * 8
    with pytest.raises(DatasetError, match="no labels to choose rows by"):
        read_split(path, "train", keep=lambda y: y >= 0)
    rgb, _ = read_split(prepare(DataConfig(source="folder", root=str(tmp_path / "in"), resolution=8, channels=3),
                                tmp_path / "out"), "train")
    assert rgb.shape[1] == 3 and np.array_equal(rgb[:, 0], rgb[:, 2])


def test_image_folder_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_source(DataConfig(source="folder", root=str(tmp_path / "empty")))
    make_images(tmp_path / "mixed", [(0, 0, 0)] * 2)
    make_images(tmp_path / "mixed" / "a", [(0, 0, 0)] * 2)
    with pytest.raises(DatasetError, match="mixes images"):
        load_source(DataConfig(source="folder", root=str(tmp_path / "mixed")))


def test_splits_are_deterministic_per_seed(tmp_path: Path) -> None:
    for source in ("ring8", "digits"):
        a, b = (load_source(DataConfig(source=source, num_samples=500, seed=3)) for _ in range(2))
        other = load_source(DataConfig(source=source, num_samples=500, seed=4))
        assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
        assert not np.array_equal(a.x_test, other.x_test)
    cfg = DataConfig(source="ring8", num_samples=500, shard_rows=100)
    one, two = load_manifest(prepare(cfg, tmp_path / "a")), load_manifest(prepare(cfg, tmp_path / "b"))
    assert one.dataset_id == two.dataset_id and one.dataset_hash == two.dataset_hash  # byte-identical shards
    shard_hashes = [hashlib.sha256(Path(p).read_bytes()).hexdigest()
                    for split in ("train", "test") for p in shard_paths(one, split)]
    assert one.dataset_hash == hashlib.sha256("".join(shard_hashes).encode()).hexdigest()


def test_second_prepare_reuses_and_force_rewrites(tmp_path: Path) -> None:
    cfg = DataConfig(source="ring8", num_samples=500, shard_rows=100)
    path = prepare(cfg, tmp_path)
    files = [path / "manifest.json", *map(Path, shard_paths(load_manifest(path), "train"))]
    before = [f.stat().st_mtime_ns for f in files]
    assert prepare(cfg, tmp_path) == path and [f.stat().st_mtime_ns for f in files] == before
    assert prepare(DataConfig(source="ring8", num_samples=500, shard_rows=100, out_dir="elsewhere",
                              resolution=16), tmp_path) == path  # fields that change nothing keep the id
    inode = path.stat().st_ino
    assert prepare(cfg, tmp_path, force=True) == path and path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp or old copies left


def corrupt(path: Path, how: str) -> None:
    """Damages shard train/part-00001 of the dataset at `path` (or its manifest entry)."""
    shard = path / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "deleted":
        shard.unlink()
    else:  # the manifest's row count for this shard no longer matches the file
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][1]["rows"] -= 1
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "deleted", "row count edited"])
def test_corrupt_shards_are_named(tmp_path: Path, how: str) -> None:
    cfg = DataConfig(source="ring8", num_samples=500, shard_rows=100)
    path = prepare(cfg, tmp_path)
    corrupt(path, how)
    with pytest.raises(DatasetError, match="part-00001.parquet"):
        verify(load_manifest(path))
    with pytest.raises(DatasetError, match="part-00001.parquet"):
        read_split(path, "train")
    verify(load_manifest(prepare(cfg, tmp_path)))  # prepare rebuilds a corrupt copy


def test_manifest_count_and_syntax_errors_name_the_manifest(tmp_path: Path) -> None:
    path = prepare(DataConfig(source="ring8", num_samples=500), tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["splits"]["test"]["count"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest.json: split test has count 101"):
        verify(load_manifest(path))
    del manifest["shape"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest.json is missing keys: shape"):
        load_manifest(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is not readable JSON"):
        load_manifest(path)


def test_crash_mid_write_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    cfg = DataConfig(source="ring8", num_samples=500, shard_rows=100)
    final = tmp_path / dataset_id(cfg)
    real_write = pq.write_table
    written: list[str] = []

    def fail_after_first(table, where, **kwargs) -> None:
        if written:
            raise OSError("disk full (simulated)")
        written.append(str(where))
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", fail_after_first)  # gan.data.prepare calls pq.write_table
    with pytest.raises(OSError, match="simulated"):
        prepare(cfg, tmp_path)
    assert written and not (final / "manifest.json").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        load_manifest(final)


def test_killed_process_leaves_no_manifest_and_prepare_recovers(tmp_path: Path) -> None:
    cfg = DataConfig(source="ring8", num_samples=500, shard_rows=100)
    script = (
        "import os, pyarrow.parquet as pq\n"
        "from gan.config import DataConfig\nfrom gan.data import prepare\n"
        "real = pq.write_table\n"
        "def crash(*a, **k):\n    real(*a, **k)\n    os._exit(3)\n"
        "pq.write_table = crash\n"
        f"prepare(DataConfig(source='ring8', num_samples=500, shard_rows=100), {str(tmp_path)!r})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, timeout=120).returncode == 3
    final = tmp_path / dataset_id(cfg)
    [leftover] = tmp_path.iterdir()
    assert leftover.name.startswith(f".{final.name}.tmp-") and not (leftover / "manifest.json").exists()
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        load_manifest(final)
    assert len(read_split(prepare(cfg, tmp_path), "train")[0]) == 400


def test_unknown_source_and_missing_torchvision_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.source must be one of"):
        DataConfig(source="imagenet")
    with pytest.raises(DatasetError, match=r"data\.root=.*data\.download=true"):
        load_source(DataConfig(source="mnist", root=str(tmp_path), download=False))


def test_decode_takes_arrow_slices_and_numpy_bytes(tmp_path: Path) -> None:
    m = load_manifest(prepare(DataConfig(source="digits", resolution=8), tmp_path))
    x, y = read_split(m, "train")
    table = pq.read_table(shard_paths(m, "train")[0])
    part = table.slice(7, 20)  # Ray batches are slices sharing the parent's buffer
    for x_col in (part.column("x"), part.column("x").to_numpy(), np.array(part.column("x").to_pylist())):
        xb, yb = decode(x_col, part.column("y").to_numpy(), m)
        assert np.array_equal(xb, x[7:27]) and np.array_equal(yb, y[7:27]) and xb.flags.writeable
    with pytest.raises(DatasetError, match="is not 64 bytes"):
        decode(np.array([b"\x00" * 63], dtype=object), None, m)


def test_keep_labels_is_exact_balanced_and_seeded() -> None:
    y = np.concatenate([np.full(50, 0), np.full(30, 1), np.full(5, 2), np.full(40, 3), np.full(10, -1)])
    kept = keep_labels(y, 14, seed=0)
    assert (kept >= 0).sum() == 14 and np.all(kept[kept >= 0] == y[kept >= 0]) and np.all(kept[-10:] == -1)
    assert sorted(np.bincount(kept[kept >= 0], minlength=4)) == [3, 3, 4, 4]
    wide = keep_labels(y, 30, seed=0)  # class 2 runs out; the others share the rest evenly
    assert sorted(np.bincount(wide[wide >= 0], minlength=4)) == [5, 8, 8, 9]
    assert np.array_equal(keep_labels(y, 14, seed=0), kept) and not np.array_equal(keep_labels(y, 14, seed=1), kept)
    with pytest.raises(DatasetError, match="cannot keep 200 labels"):
        keep_labels(y, 200, seed=0)
