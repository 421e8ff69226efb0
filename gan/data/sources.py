"""Dataset sources -> split numpy arrays: 2-D mixtures, sklearn digits, torchvision sets, IDX files, image folders."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import resize

from gan.config import SOURCES, ConfigError, DataConfig
from gan.data.reader import DatasetError

MODE_SIGMA = {"ring8": 0.01, "grid25": 0.05}
# Divisors that bring the farthest mode (plus a few sigma) well inside tanh's (-1, 1).
POINT_SCALE = {"ring8": 1.5, "grid25": 5.0}
TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Split = tuple[np.ndarray, "np.ndarray | None", np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class SourceData:
    """A source's examples: uint8 images (N, C, H, W) or float32 points (N, 2); y int64, or None if unlabelled."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    kind: str
    num_classes: int
    scale: float


def mode_centres(source: str) -> np.ndarray:
    """Centres (M, 2) of a 2-D mixture's modes, indexed by the label `load_source` gives each point."""
    if source == "ring8":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if source == "grid25":
        xx, yy = np.meshgrid(np.arange(-4.0, 5.0, 2.0), np.arange(-4.0, 5.0, 2.0), indexing="ij")
        return np.stack([xx.ravel(), yy.ravel()], axis=1)
    raise ValueError(f"{source!r} is not a 2-D mixture; expected one of {', '.join(MODE_SIGMA)}")


def default_root() -> Path:
    """Where torchvision datasets are cached when data.root is empty."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raygan" / "torchvision"


def load_source(cfg: DataConfig) -> SourceData:
    """Loads `cfg.source` and splits it (official split where the source has one, else seeded)."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
    if cfg.is_points:
        centres = mode_centres(cfg.source)
        rng = np.random.default_rng([cfg.seed, 0])
        y = rng.integers(0, len(centres), cfg.num_samples)
        x = centres[y] + MODE_SIGMA[cfg.source] * rng.standard_normal((cfg.num_samples, 2))
        parts = _split(x.astype(np.float32), y.astype(np.int64), cfg)
        return SourceData(*parts, kind="points", num_classes=len(centres), scale=POINT_SCALE[cfg.source])
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
        parts = _split(x, digits.target.astype(np.int64), cfg)
    elif cfg.source in TORCHVISION:
        parts = _torchvision(cfg)
    elif cfg.source == "idx":
        parts = _idx(cfg)
    else:
        parts = _folder(cfg)
    x_train, y_train, x_test, y_test = parts
    x_train, x_test = (_resize(_channels(x, cfg.channels), cfg.resolution) for x in (x_train, x_test))
    num_classes = 0 if y_train is None else int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    return SourceData(x_train, y_train, x_test, y_test, kind="image", num_classes=num_classes, scale=1.0)


def input_files(cfg: DataConfig) -> list[Path]:
    """The files an idx/folder dataset is made from (empty for built-in sources)."""
    if cfg.source == "idx":
        return [p for pair in _idx_pairs(_root(cfg)).values() for p in pair]
    if cfg.source == "folder":
        return _folder_files(_root(cfg))[0]
    return []


def input_fingerprint(cfg: DataConfig) -> str:
    """Hash of the input files' relative names, sizes and mtimes: edited inputs give a new dataset id."""
    digest = hashlib.sha256()
    for path in input_files(cfg):
        st = path.stat()
        digest.update(f"{path.relative_to(_root(cfg))}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser()


def _split(x: np.ndarray, y: np.ndarray | None, cfg: DataConfig) -> Split:
    n = len(x)
    n_test = min(n - 1, max(1, round(n * cfg.test_fraction)))
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
    # Sorted indices keep each split in the source's order, which makes the split easy to audit.
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return x[train], None if y is None else y[train], x[test], None if y is None else y[test]


def _channels(x: np.ndarray, channels: int) -> np.ndarray:
    if channels == 0 or x.shape[1] == channels:
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=1)
    weights = np.array([299, 587, 114], np.uint32).reshape(1, 3, 1, 1)  # PIL's ITU-R 601-2 luma, in 1/1000
    return (((x.astype(np.uint32) * weights).sum(axis=1, keepdims=True) + 500) // 1000).astype(np.uint8)


def _resize(x: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size) by antialiased bilinear interpolation, rounded.

    torchvision.transforms.functional.resize computes in float32 and rounds; the v2 resize uses a native uint8
    kernel on CPUs with AVX2 whose rounding differs by up to 1, which would change the stored data by machine.
    """
    if x.shape[-2:] == (size, size):
        return x
    out = np.empty((len(x), x.shape[1], size, size), np.uint8)
    for i in range(0, len(x), chunk):
        batch = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk]))
        out[i:i + chunk] = resize(batch, [size, size], antialias=True).numpy()
    return out


def _torchvision(cfg: DataConfig) -> Split:
    import torchvision

    root = Path(cfg.root).expanduser() if cfg.root else default_root()
    dataset_cls = getattr(torchvision.datasets, TORCHVISION[cfg.source])
    parts: list[np.ndarray] = []
    for train in (True, False):
        try:
            ds = dataset_cls(root=str(root), train=train, download=cfg.download)
        except (RuntimeError, OSError) as err:  # torchvision's "Dataset not found", or a failed download
            what = "could not be downloaded" if cfg.download else "files are not there"
            raise DatasetError(
                f"{cfg.source} {what} under data.root={str(root)!r} ({err}). Copy them there in the layout "
                f"torchvision.datasets.{dataset_cls.__name__} expects, or set data.download=true on a machine "
                "with internet access.") from err
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST (N, H, W); CIFAR (N, H, W, C)
        parts += [np.ascontiguousarray(x), np.asarray(ds.targets, dtype=np.int64)]
    return parts[0], parts[1], parts[2], parts[3]


def read_idx(path: Path) -> np.ndarray:
    """Parses one IDX file (optionally gzipped): magic 00 00 <type> <ndim>, big-endian int32 dims, data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: cannot read IDX file: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an IDX file (magic {raw[:4].hex()!r}; expected 0000, a type byte "
                           f"in {sorted(_IDX_TYPES)}, and the number of dimensions)")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{raw[3]}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        why = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetError(f"{path}: {why}: {len(raw)} bytes, but dims {list(dims)} need {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Images/labels IDX files paired by their name prefix (`train-`, `t10k-`, ...)."""
    if not folder.is_dir():
        raise DatasetError(f"data.root={str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = {p.name.split("images")[0]: p for p in files if "images" in p.name and "idx3" in p.name}
    labels = {p.name.split("labels")[0]: p for p in files if "labels" in p.name and "idx1" in p.name}
    if not images:
        raise DatasetError(f"data.root={str(folder)!r} holds no IDX images file (*images*idx3*, "
                           "e.g. train-images-idx3-ubyte.gz)")
    unpaired = sorted(p.name for k, p in {**images, **labels}.items() if k not in images or k not in labels)
    if unpaired:
        raise DatasetError(f"data.root={str(folder)!r}: IDX files without an images/labels partner: {unpaired}")
    return {k: (images[k], labels[k]) for k in images}


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images (N, H, W), got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise DatasetError(f"{labels_path}: expected {len(x)} non-negative integer labels to match "
                           f"{images_path.name}, got {y.dtype} {list(y.shape)}")
    return x[:, None], y.astype(np.int64)


def _idx(cfg: DataConfig) -> Split:
    pairs = _idx_pairs(_root(cfg))
    if len(pairs) == 1:
        x, y = _load_idx_pair(*next(iter(pairs.values())))
        return _split(x, y, cfg)
    train = [k for k in pairs if k.startswith("train")]
    test = [k for k in pairs if k.startswith(("t10k", "test"))]
    if len(pairs) != 2 or len(train) != 1 or len(test) != 1:
        raise DatasetError(f"data.root={cfg.root!r}: found IDX pairs {sorted(pairs)}; expected one pair "
                           "(split by data.test_fraction) or a train-* and a t10k-*/test-* pair")
    x_train, y_train = _load_idx_pair(*pairs[train[0]])
    x_test, y_test = _load_idx_pair(*pairs[test[0]])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"data.root={cfg.root!r}: train images are {list(x_train.shape[1:])} but test "
                           f"images are {list(x_test.shape[1:])}")
    return x_train, y_train, x_test, y_test


def _folder_files(root: Path) -> tuple[list[Path], list[int] | None]:
    """Image files under `root`, and their class indices when they sit in one sub-folder per class."""
    if not root.is_dir():
        raise DatasetError(f"data.root={str(root)!r} is not a folder")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))

    classes = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and images_in(d)]
    flat = images_in(root)
    if classes and flat:
        raise DatasetError(f"data.root={str(root)!r} mixes images at the top level with class sub-folders "
                           f"{[d.name for d in classes]}; use one layout")
    if flat:
        return flat, None
    if not classes:
        raise DatasetError(f"data.root={str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither at "
                           "the top level nor in class sub-folders")
    per_class = [images_in(d) for d in classes]
    return [p for files in per_class for p in files], [i for i, fs in enumerate(per_class) for _ in fs]


def _folder(cfg: DataConfig) -> Split:
    from PIL import Image

    files, labels = _folder_files(_root(cfg))

    def read(path: Path, mode: str) -> Image.Image:
        """`mode` "" opens the header only (to see the file's mode)."""
        try:
            with Image.open(path) as image:
                return image.convert(mode) if mode else image
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path}: cannot read image: {err}") from err

    channels = cfg.channels or (1 if all(read(p, "").mode in GREY_MODES for p in files) else 3)
    size = cfg.resolution
    x = np.empty((len(files), channels, size, size), np.uint8)
    for i, path in enumerate(files):
        image = read(path, "L" if channels == 1 else "RGB")
        w, h = image.size
        side = min(w, h)  # centre crop to a square first, so resizing keeps the aspect ratio
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.uint8)
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return _split(x, None if labels is None else np.asarray(labels, np.int64), cfg)
