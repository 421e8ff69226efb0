"""Storage URIs: joined and resolved by closed forms; datasets, evaluators and checkpoints round-trip through a real
S3-compatible server on 127.0.0.1 with the local disk's guarantees; every bad URI and broken object is named."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from gan import storage
from gan.checkpoint import CheckpointError, read_checkpoint
from gan.config import DataConfig
from gan.config_loader import load_config
from gan.data import DatasetError, load_manifest, prepare, read_split, shard_paths, verify
from gan.loop import DataSpec, fit, save_state
from gan.metrics import load_evaluator, save_evaluator
from gan.metrics.evaluator import META_FILE, Evaluator
from pipelines.cli import main
from tests.s3 import s3_server

RING = DataConfig(source="ring8", num_samples=600, shard_rows=200)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One S3 server for the module; this process holds the bucket's credentials while it runs."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as env:
        for key, value in server.env.items():
            env.setenv(key, value)
        storage._filesystem.cache_clear()
        yield server
    storage._filesystem.cache_clear()


def test_locations_join_and_resolve_by_closed_forms(tmp_path):
    uri = "s3://bkt/runs/?endpoint_override=http://127.0.0.1:9000"
    assert storage.normalize(uri) == "s3://bkt/runs?endpoint_override=http://127.0.0.1:9000"
    assert storage.join(uri, "data", "/x/") == "s3://bkt/runs/data/x?endpoint_override=http://127.0.0.1:9000"
    assert storage.name(storage.join(uri, "ray")) == "ray"
    assert storage.parent(storage.join(uri, "ray")) == storage.normalize(uri)
    assert storage.uri_of(uri, "bkt/runs/ray/c-1") == "s3://bkt/runs/ray/c-1?endpoint_override=http://127.0.0.1:9000"
    assert storage.uri_of("gs://b/p", "b/p/q") == "gs://b/p/q"
    assert storage.normalize(f"file://{tmp_path}/a/") == str(tmp_path / "a")
    assert storage.join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")
    assert storage.uri_of(tmp_path, str(tmp_path / "c")) == str(tmp_path / "c")
    assert storage.is_local("runs") and storage.is_local("file:///x") and not storage.is_local(uri)
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/runs"


def test_local_publish_is_whole_and_keeps_a_copy_already_there(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"first")
    (tmp_path / "a" / "done.json").write_text("{}")
    target = storage.publish(tmp_path / "a", tmp_path / "out" / "e", last="done.json")
    (tmp_path / "a" / "w.bin").write_bytes(b"second")
    assert storage.publish(tmp_path / "a", target, last="done.json") == target
    assert storage.read_bytes(storage.join(target, "w.bin")) == b"first"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["e"]  # no temp folder left beside


def test_a_dataset_prepared_in_the_bucket_reads_back_as_the_local_one(s3, tmp_path):
    local = load_manifest(prepare(RING, tmp_path))
    remote = prepare(RING, s3.uri("same/data"))
    assert remote == storage.join(s3.uri("same/data"), local.dataset_id)
    manifest = load_manifest(remote)
    verify(manifest)
    assert manifest.dataset_hash == local.dataset_hash
    for split in ("train", "test"):
        assert np.array_equal(read_split(manifest, split)[0], read_split(local, split)[0])
    assert s3.keys(f"same/data/{local.dataset_id}/")[-1].endswith("train/part-00002.parquet")
    assert prepare(RING, s3.uri("same/data")) == remote  # a valid copy is reused


def test_a_prepare_that_dies_before_the_manifest_leaves_no_dataset(s3, monkeypatch):
    copy = pafs.copy_files

    def dies_at_the_manifest(src, dst, **kwargs):
        if dst.endswith("manifest.json"):
            raise OSError("killed")
        return copy(src, dst, **kwargs)

    monkeypatch.setattr(storage.pafs, "copy_files", dies_at_the_manifest)
    with pytest.raises(OSError, match="killed"):
        prepare(RING, s3.uri("crash/data"))
    ds_id = storage.list_names(s3.uri("crash/data"))[0]
    assert storage.list_names(s3.uri(f"crash/data/{ds_id}")) == ["test", "train"]  # shards went first
    with pytest.raises(DatasetError, match=r"manifest\.json\S* is missing"):
        load_manifest(s3.uri(f"crash/data/{ds_id}"))
    monkeypatch.setattr(storage.pafs, "copy_files", copy)
    verify(load_manifest(prepare(RING, s3.uri("crash/data"))))


def test_a_deleted_or_truncated_shard_in_the_bucket_is_named(s3):
    manifest = load_manifest(prepare(RING, s3.uri("broken/data")))
    first, second = shard_paths(manifest, "train")[:2]
    fs, path = storage.resolve(first)
    data = storage.read_bytes(first)
    storage.write_bytes(first, data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"shard {first.split('?')[0]}.* truncated or unreadable"):
        verify(manifest)
    storage.write_bytes(first, data)
    fs.delete_file(storage.resolve(second)[1])
    with pytest.raises(DatasetError, match=rf"shard {second.split('?')[0]}.* is missing"):
        verify(manifest)


def test_evaluator_and_checkpoint_round_trip_and_a_truncated_one_is_named(s3, tmp_path):
    model = Evaluator(in_channels=1, resolution=8, num_classes=10)
    save_evaluator(model, tmp_path / "ev", meta={"metrics": {}})
    uri = storage.publish(tmp_path / "ev", s3.uri("ev/one"), last=META_FILE)
    loaded = load_evaluator(uri)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    weights = storage.join(uri, "evaluator.pt")
    storage.write_bytes(weights, storage.read_bytes(weights)[:100])
    with pytest.raises(ValueError, match=rf"{weights.split('?')[0]}.*truncated or unreadable"):
        load_evaluator(uri)

    cfg = load_config(None, ["data.source=ring8", "model.hidden=[8]", "train.kimg=0.128", "train.batch_size=64"])
    dataset = load_manifest(prepare(cfg.data, tmp_path / "data"))
    real = torch.from_numpy(read_split(dataset, "train")[0][:64])
    state = fit(cfg, lambda epoch: iter([(real, None)] * 2), spec=DataSpec.from_manifest(dataset),
                report=lambda m, c: None)
    local = save_state(state, tmp_path / "ckpt", cfg, DataSpec.from_manifest(dataset))
    remote = storage.join(s3.uri("ckpt"), "checkpoint-1")
    storage.upload(local, remote)
    assert read_checkpoint(remote)["counters"]["images"] == read_checkpoint(local)["counters"]["images"] == 128
    state_file = storage.join(remote, "state.pt")
    storage.write_bytes(state_file, storage.read_bytes(state_file)[:200])
    with pytest.raises(CheckpointError, match=rf"{state_file.split('?')[0]}.*truncated or unreadable"):
        read_checkpoint(remote)


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "unknown scheme", "wrong credentials"])
def test_bad_storage_is_an_error_that_names_the_uri_and_what_to_set(s3, monkeypatch, case):
    uri = {"missing bucket": f"s3://no-such-bucket/p?endpoint_override={s3.endpoint}",
           "unreachable endpoint": "s3://raygan/p?endpoint_override=http://127.0.0.1:9",
           "unknown scheme": "nosuch://bucket/p", "wrong credentials": s3.uri("p")}[case]
    expected = {"missing bucket": "NO_SUCH_BUCKET", "unreachable endpoint": "connect",
                "unknown scheme": "use a local path, file://PATH, s3://BUCKET/PREFIX",
                "wrong credentials": "AWS_ACCESS_KEY_ID"}[case]
    if case == "wrong credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        storage._filesystem.cache_clear()
    with pytest.raises(storage.StorageError) as err:
        storage.probe(uri, "test")
    storage._filesystem.cache_clear()
    assert uri.split("?")[0].split("/p")[0] in str(err.value) and expected.lower() in str(err.value).lower()


def test_the_endpoint_can_come_from_aws_endpoint_url(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    storage._filesystem.cache_clear()
    storage.probe("s3://raygan/from-env", "test")
    storage._filesystem.cache_clear()
    assert s3.keys("from-env/") == ["from-env/.probe/"]  # the folder marker pyarrow leaves; the probe is gone


def test_the_cli_refuses_bad_storage_before_ray_starts(s3, capsys):
    assert main(["run", "--config", "configs/quickstart.yaml", "--storage",
                 f"s3://no-such-bucket/x?endpoint_override={s3.endpoint}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("storage error: storage s3://no-such-bucket/x") and "bucket exists" in err
