"""Prepares a dataset once: source -> Parquet shards + manifest, published atomically under a content id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gan import storage
from gan.config import DataConfig
from gan.data.reader import DTYPES, FORMAT_VERSION, DatasetError, content_hash, load_manifest, sha256_file, verify
from gan.data.sources import TORCHVISION, SourceData, input_fingerprint, load_source

log = logging.getLogger(__name__)


def content_key(cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig fields that decide a dataset's bytes; idx/folder inputs enter by fingerprint, not path."""
    key = dataclasses.asdict(cfg)
    for name in ("out_dir", "download", "root", "cache_mb"):
        del key[name]
    if cfg.is_points:
        del key["resolution"], key["channels"]
    else:
        del key["num_samples"]
    if cfg.source in TORCHVISION:  # official split: seed and test_fraction change nothing
        del key["seed"], key["test_fraction"]
    if cfg.source in ("idx", "folder"):
        key["inputs"] = input_fingerprint(cfg)
    key["format_version"] = FORMAT_VERSION
    return key


def dataset_id(cfg: DataConfig) -> str:
    """`<source>-<16 hex>`: equal ids mean equal content, so a prepared dataset can be reused."""
    digest = hashlib.sha256(json.dumps(content_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.source}-{digest}"


def prepare(cfg: DataConfig, out_dir: str | Path | None = None, *, force: bool = False) -> Path | str:
    """Writes `<out_dir or cfg.out_dir>/<dataset id>/` (train/ and test/ Parquet shards, manifest.json) and
    returns it (a Path on local disk, the URI in object storage); an existing valid copy is reused unless `force`.
    Readers never see a half-written dataset."""
    where = out_dir if out_dir is not None else cfg.out_dir
    if not storage.is_local(where):
        return _prepare_in_object_store(cfg, storage.normalize(where), force=force)
    parent = Path(storage.normalize(where))
    ds_id = dataset_id(cfg)
    final = parent / ds_id
    if not force and _is_valid(final):
        return final
    src = load_source(cfg)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{ds_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(src, cfg, ds_id, tmp)
        _publish(tmp, final, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prepare_in_object_store(cfg: DataConfig, parent: str, *, force: bool) -> str:
    """Object stores have no rename: the shards are uploaded first and the manifest last, so a crash mid-upload
    leaves no manifest and the next prepare writes the folder again."""
    ds_id = dataset_id(cfg)
    final = storage.join(parent, ds_id)
    if not force and _is_valid(final):
        return final
    src = load_source(cfg)
    with tempfile.TemporaryDirectory(prefix="gan-prepare-") as tmp:
        _write(src, cfg, ds_id, Path(tmp) / ds_id)
        storage.delete(storage.join(final, "manifest.json"))  # un-publish the copy being replaced first
        storage.upload(Path(tmp) / ds_id, final, last="manifest.json")
    return final


def _write(src: SourceData, cfg: DataConfig, ds_id: str, tmp: Path) -> None:
    shape = list(src.x_train.shape[1:])
    dtype = "float32" if src.kind == "points" else "uint8"
    splits: dict[str, Any] = {}
    for split, x, y in (("train", src.x_train, src.y_train), ("test", src.x_test, src.y_test)):
        (tmp / split).mkdir(parents=True)
        x = np.ascontiguousarray(x, dtype=DTYPES[dtype])
        shards = []
        for i, start in enumerate(range(0, len(x), cfg.shard_rows)):
            file = f"{split}/part-{i:05d}.parquet"
            stop = start + cfg.shard_rows
            _write_shard(tmp / file, x[start:stop], None if y is None else y[start:stop])
            shards.append({"file": file, "rows": len(x[start:stop]), "sha256": sha256_file(tmp / file)})
        _fsync_dir(tmp / split)
        splits[split] = {"count": len(x), "shards": shards}
    labels = [] if src.y_train is None else np.union1d(src.y_train, src.y_test).tolist()
    manifest = {
        "format_version": FORMAT_VERSION, "dataset_id": ds_id, "source": cfg.source, "kind": src.kind,
        "shape": shape, "dtype": dtype, "num_classes": src.num_classes, "labels": labels, "scale": src.scale,
        "config": dataclasses.asdict(cfg), "splits": splits, "dataset_hash": content_hash(splits),
    }
    # The manifest goes last: its presence is what marks the folder complete.
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _write_shard(path: Path, x: np.ndarray, y: np.ndarray | None) -> None:
    width = x[0].nbytes if len(x) else 0
    data = pa.py_buffer(x.reshape(len(x), -1).view(np.uint8).reshape(-1))
    xs = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, data])
    ys = pa.array(np.full(len(x), -1, np.int64) if y is None else np.asarray(y, np.int64), pa.int64())
    pq.write_table(pa.Table.from_arrays([xs, ys], names=["x", "y"]), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_valid(folder: Path | str) -> bool:
    try:
        verify(load_manifest(folder))
        return True
    except DatasetError as err:
        if storage.exists(storage.join(folder, "manifest.json")):
            log.warning("rebuilding %s: %s", folder, err)
        return False


def _publish(tmp: Path, final: Path, *, replace: bool) -> None:
    """Renames the finished temp folder onto `final`; an existing copy is moved aside first, unless it is
    valid and `replace` is false (a concurrent prepare of the same id won: keep the copy readers may use)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        if not replace and _is_valid(final):
            return
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_valid(final):  # lost a race to another prepare, and its copy is not usable either
            raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
