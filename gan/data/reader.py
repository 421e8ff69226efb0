"""Reads prepared datasets back: manifest loading, shard verification, one decoder for Parquet batches."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gan import storage

FORMAT_VERSION = 1
SPLITS = ("train", "test")
DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}  # float32 is stored little-endian
_KEYS = ("format_version", "dataset_id", "source", "kind", "shape", "dtype", "num_classes", "labels", "scale",
         "config", "splits", "dataset_hash")


class DatasetError(ValueError):
    """A dataset is missing, incomplete or corrupt; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset's manifest.json, plus the folder it lives in."""

    dataset_id: str
    source: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    num_classes: int
    labels: tuple[int, ...]
    scale: float
    dataset_hash: str
    splits: dict[str, Any]
    config: dict[str, Any]
    path: str
    """The dataset's folder: an absolute local path or a storage URI (s3://bucket/prefix/<id>)."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one example in the `x` column."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def count(self, split: str) -> int:
        return self.splits[_check_split(self, split)]["count"]


def sha256_file(path: str | Path, filesystem: pafs.FileSystem | None = None) -> str:
    """sha256 of a file, local or (with `filesystem`) in object storage, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with (filesystem or pafs.LocalFileSystem()).open_input_stream(str(path)) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_hash(splits: dict[str, Any]) -> str:
    """The dataset's content hash: sha256 over its shard hashes, train shards then test shards, in order."""
    hashes = "".join(shard["sha256"] for name in SPLITS for shard in splits[name]["shards"])
    return hashlib.sha256(hashes.encode()).hexdigest()


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Loads and checks `<dataset_dir>/manifest.json` (structure only; `verify` checks the shards). `dataset_dir`
    is a local folder or a storage URI."""
    folder = storage.normalize(dataset_dir)
    file = storage.join(folder, "manifest.json")
    try:
        present = storage.is_file(file)
    except OSError as err:
        raise DatasetError(f"{file} cannot be read: {err}") from err
    if not present:
        raise DatasetError(f"{folder} is not a prepared dataset: {file} is missing (never prepared, or an "
                           "interrupted prepare left it incomplete); run prepare first")
    try:
        raw = json.loads(storage.read_bytes(file).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{file} is not readable JSON: {err}") from err
    if not isinstance(raw, dict):
        raise DatasetError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise DatasetError(f"{file} is missing keys: {', '.join(missing)}")
    if raw["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{file} has format_version {raw['format_version']!r}; this code reads {FORMAT_VERSION}")
    try:
        manifest = Manifest(
            dataset_id=str(raw["dataset_id"]), source=str(raw["source"]), kind=str(raw["kind"]),
            shape=tuple(int(d) for d in raw["shape"]), dtype=str(raw["dtype"]),
            num_classes=int(raw["num_classes"]), labels=tuple(int(v) for v in raw["labels"]),
            scale=float(raw["scale"]), dataset_hash=str(raw["dataset_hash"]), splits=dict(raw["splits"]),
            config=dict(raw["config"]), path=folder)
        _check_structure(manifest)
    except (TypeError, ValueError, KeyError) as err:
        raise DatasetError(f"{file} is malformed: {err}") from err
    if content_hash(manifest.splits) != manifest.dataset_hash:
        raise DatasetError(f"{file}: dataset_hash does not match the shard hashes it lists")
    return manifest


def _check_structure(m: Manifest) -> None:
    if m.kind not in ("points", "image") or m.dtype not in DTYPES or not m.shape or min(m.shape) < 1:
        raise ValueError(f"bad kind/dtype/shape: {m.kind!r}, {m.dtype!r}, {list(m.shape)}")
    for name in SPLITS:
        split = m.splits[name]
        int(split["count"])
        for shard in split["shards"]:
            file = Path(shard["file"])
            if file.is_absolute() or ".." in file.parts:
                raise ValueError(f"shard path {shard['file']!r} must be relative to the dataset folder")
            int(shard["rows"])
            str(shard["sha256"])


def _check_split(manifest: Manifest, split: str) -> str:
    if split not in manifest.splits:
        raise DatasetError(f"{manifest.path}: no split {split!r}; it has {', '.join(manifest.splits)}")
    return split


def shard_paths(manifest: Manifest, split: str) -> list[str]:
    """Locations (absolute paths or URIs) of a split's shards, in order."""
    return [storage.join(manifest.path, s["file"]) for s in manifest.splits[_check_split(manifest, split)]["shards"]]


def shard_files(manifest: Manifest, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The dataset's filesystem and its split's shards as paths in it, in order (what `pq.read_table` and
    `ray.data.read_parquet(paths, filesystem=...)` take)."""
    fs, root = storage.resolve(manifest.path)
    return fs, [f"{root}/{s['file']}" for s in manifest.splits[_check_split(manifest, split)]["shards"]]


def verify(manifest: Manifest, split: str | None = None) -> None:
    """Checks every shard of `split` (default: all) exists, reads as Parquet with the right schema and row
    count, and matches its sha256; raises DatasetError naming the file otherwise."""
    for name in SPLITS if split is None else (_check_split(manifest, split),):
        info = manifest.splits[name]
        for shard in info["shards"]:
            _verify_shard(manifest, shard)
        total = sum(s["rows"] for s in info["shards"])
        if total != info["count"]:
            raise DatasetError(f"{storage.join(manifest.path, 'manifest.json')}: split {name} has count "
                               f"{info['count']} but its shards list {total} rows")


_verify = verify  # read_split's `verify` flag shadows the function


def _verify_shard(manifest: Manifest, shard: dict[str, Any]) -> None:
    path = storage.join(manifest.path, shard["file"])
    fs, fs_path = storage.resolve(path)
    if fs.get_file_info(fs_path).type != pafs.FileType.File:
        raise DatasetError(f"shard {path} is missing")
    try:
        meta = pq.read_metadata(fs_path, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"shard {path} is truncated or unreadable as Parquet: {err}") from err
    x_type = schema.field("x").type if "x" in schema.names else None
    if (schema.names != ["x", "y"] or not pa.types.is_fixed_size_binary(x_type)
            or schema.field("y").type != pa.int64()):
        raise DatasetError(f"shard {path} has schema {schema.to_string()!r}; "
                           f"expected x: fixed_size_binary[{manifest.row_bytes}], y: int64")
    if x_type.byte_width != manifest.row_bytes:
        raise DatasetError(f"shard {path} has the wrong width: {x_type.byte_width} bytes per row, expected "
                           f"{manifest.row_bytes} for {manifest.dtype} {list(manifest.shape)}")
    if meta.num_rows != shard["rows"]:
        raise DatasetError(f"shard {path} has the wrong row count: {meta.num_rows}, manifest says {shard['rows']}")
    digest = sha256_file(fs_path, fs)
    if digest != shard["sha256"]:
        raise DatasetError(f"shard {path} fails its checksum: sha256 {digest}, manifest says {shard['sha256']}")


def _x_bytes(x_column: Any, width: int) -> np.ndarray:
    """Raw bytes (N * width,) of an `x` column given as a pyarrow array or a numpy array of bytes."""
    if isinstance(x_column, pa.ChunkedArray):
        x_column = x_column.combine_chunks() if x_column.num_chunks != 1 else x_column.chunk(0)
    if isinstance(x_column, pa.Array):
        if not pa.types.is_fixed_size_binary(x_column.type) or x_column.type.byte_width != width:
            raise DatasetError(f"x column has type {x_column.type}, expected fixed_size_binary[{width}]")
        if x_column.null_count:
            raise DatasetError(f"x column has {x_column.null_count} null rows")
        n = len(x_column)
        if n == 0:
            return np.empty(0, np.uint8)
        # A sliced array (as in a Ray batch) shares its parent's buffer from `offset` on.
        return np.frombuffer(x_column.buffers()[1], np.uint8, count=n * width, offset=x_column.offset * width)
    arr = np.asarray(x_column)
    if arr.dtype.kind == "S" and arr.dtype.itemsize <= width:
        # numpy bytes drop trailing NULs; padding them back restores the stored bytes.
        return np.frombuffer(arr.astype(f"S{width}").tobytes(), np.uint8)
    if arr.dtype == object:
        items = arr.ravel().tolist()
        bad = [i for i, b in enumerate(items) if not isinstance(b, bytes)
               or (len(b) != width and not (isinstance(b, np.bytes_) and len(b) < width))]
        if bad:
            raise DatasetError(f"x column row {bad[0]} is not {width} bytes: {items[bad[0]]!r:.60}")
        return np.frombuffer(np.array(items, dtype=f"S{width}").tobytes(), np.uint8) if items else np.empty(0, np.uint8)
    if arr.dtype == np.uint8 and arr.ndim == 2 and arr.shape[1] == width:
        return arr.ravel()
    raise DatasetError(f"x column of {arr.dtype} {list(arr.shape)} is not a column of {width}-byte values")


def decode(x_column: Any, y_column: Any, manifest: Manifest) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch of stored values -> (x (N, *shape) in the stored dtype, y int64 or None when unlabelled).
    Takes pyarrow (Chunked)Arrays or numpy arrays of bytes, as Ray Data hands out."""
    data = _x_bytes(x_column, manifest.row_bytes)
    x = data.view(DTYPES[manifest.dtype]).reshape(-1, *manifest.shape).astype(manifest.dtype)  # a copy we own
    if not manifest.labelled:
        return x, None
    if y_column is None:
        raise DatasetError(f"dataset {manifest.dataset_id} is labelled but no y column was given")
    if isinstance(y_column, (pa.Array, pa.ChunkedArray)):
        if y_column.null_count:
            raise DatasetError(f"y column has {y_column.null_count} null rows")
        y_column = y_column.to_numpy()
    y = np.asarray(y_column).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise DatasetError(f"batch has {len(x)} x values but {len(y)} labels")
    return x, y


def _read_shards(manifest: Manifest, split: str, columns: list[str]) -> Iterator[pa.Table]:
    """The split's shards one at a time (a caller that drops rows never holds more than one whole shard)."""
    fs, paths = shard_files(manifest, split)
    for path, location in zip(paths, shard_paths(manifest, split)):
        try:
            table = pq.read_table(path, columns=columns, filesystem=fs)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"shard {location} is unreadable as Parquet: {err}") from err
        yield table


def read_split(dataset: str | Path | Manifest, split: str, *, verify: bool = True,
               keep: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """All of a split in memory: x (N, *shape) in the stored dtype, y int64 (None when unlabelled).

    `keep` (labelled splits) maps all of the split's labels to a boolean mask of the rows to return; the labels are
    read first and the other rows dropped shard by shard, so a few kept rows never cost the whole split's memory."""
    manifest = dataset if isinstance(dataset, Manifest) else load_manifest(dataset)
    if verify:
        _verify(manifest, split)
    if keep is not None:
        if not manifest.labelled:
            raise DatasetError(f"dataset {manifest.dataset_id} has no labels to choose rows by")
        labels = [t.column("y").to_numpy() for t in _read_shards(manifest, split, ["y"])]
        total = sum(map(len, labels))
        if total != manifest.count(split):
            raise DatasetError(f"{manifest.path}: split {split} holds {total} rows, manifest says "
                               f"{manifest.count(split)}")
        mask = np.asarray(keep(np.concatenate(labels).astype(np.int64) if labels else np.empty(0, np.int64)), bool)
        bounds = np.cumsum([0, *map(len, labels)])
    tables = []
    for i, table in enumerate(_read_shards(manifest, split, ["x", "y"])):
        tables.append(table if keep is None else table.filter(pa.array(mask[bounds[i]:bounds[i + 1]])))
    if not tables:
        x = np.empty((0, *manifest.shape), manifest.dtype)
        return x, (np.empty(0, np.int64) if manifest.labelled else None)
    table = pa.concat_tables(tables)
    x, y = decode(table.column("x"), table.column("y"), manifest)
    if keep is None and len(x) != manifest.count(split):
        raise DatasetError(f"{manifest.path}: split {split} holds {len(x)} rows, manifest says "
                           f"{manifest.count(split)}")
    return x, y


def keep_labels(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A copy of `y` in which only `n` examples keep their label (the rest -1), as class-balanced as the
    class sizes allow; which ones is fixed by `seed`. Entries already -1 stay -1."""
    y = np.asarray(y, dtype=np.int64)
    classes = np.unique(y[y >= 0])
    available = int((y >= 0).sum())
    if not 0 <= n <= available:
        raise DatasetError(f"cannot keep {n} labels: there are {available} labelled examples")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in rng.permutation(classes)]
    # Round robin over the classes: the r-th pick of every class comes before any class's (r+1)-th.
    rounds = max((len(idx) for idx in per_class), default=0)
    order = [idx[r] for r in range(rounds) for idx in per_class if r < len(idx)]
    out = np.full_like(y, -1)
    kept = np.asarray(order[:n], dtype=np.int64)
    out[kept] = y[kept]
    return out
