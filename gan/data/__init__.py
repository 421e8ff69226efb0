"""Datasets: sources -> Parquet shards + manifest (prepare), and reading them back with validation."""

from gan.data.prepare import prepare
from gan.data.reader import (
    DatasetError,
    Manifest,
    decode,
    keep_labels,
    load_manifest,
    read_split,
    shard_files,
    shard_paths,
    verify,
)
from gan.data.sources import MODE_SIGMA, load_source, mode_centres
from gan.data.transforms import to_model_range, to_pixels, to_points

__all__ = [
    "MODE_SIGMA", "DatasetError", "Manifest", "decode", "keep_labels", "load_manifest", "load_source",
    "mode_centres", "prepare", "read_split", "shard_files", "shard_paths", "to_model_range", "to_pixels", "to_points",
    "verify",
]
