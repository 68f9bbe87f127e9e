"""Analyses reading shards straight from S3 (moto on 127.0.0.1): same answers as from the local
copy, ranged GETs reassemble the object, the read-ahead ends with its reader, corruption caught."""

from __future__ import annotations

import threading

import boto3
import numpy as np
import pytest
import torch

from mechray import MechIntHooks, ShardStore
from mechray.analysis.engine import Engine
from mechray.errors import ShardError
from mechray.storage import reader


def _both(tmp_path, endpoint, bucket, steps=4, rows=300, d=16, **extra):
    """A store captured to a local directory and to S3 at once (the 'both' backend)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, d), torch.nn.ReLU())
    config = {"sample_layers": ["1"], "storage_backend": "both",
              "storage_path": str(tmp_path / "local"), "s3_bucket": bucket, "s3_prefix": "exp",
              "s3_endpoint_url": endpoint, "use_ray": False, **extra}
    g = torch.Generator().manual_seed(0)
    with MechIntHooks(config).attach(model) as hooks:
        for step in range(steps):
            with torch.no_grad():
                model(torch.randn(rows, 8, generator=g))
            hooks.sampler.save_activations(step)
    local = ShardStore(tmp_path / "local")
    remote = ShardStore(f"s3://{bucket}/exp", endpoint_url=endpoint,
                        cache_dir=str(tmp_path / "dl"))
    return local, remote


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mechray-read-ahead")]


def test_analyses_from_s3_equal_local_with_ranged_gets_and_no_cache_files(
        tmp_path, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    local, remote = _both(tmp_path, endpoint, bucket)
    monkeypatch.setattr(reader, "PART_BYTES", 4096)    # every shard in several ranged GETs
    params = {"neuron": {"top_k": 3}, "feature": {"n_components": 3, "n_clusters": 0}}
    got = {}
    for name, store in (("local", local), ("s3", remote)):
        got[name] = Engine(store, use_ray=False, progress=False, shards_per_task=3).run(
            ["neuron", "feature"], params)
    assert got["s3"] == got["local"]
    assert got["s3"]["neuron"]["1"]["num_samples"] == 4 * 300
    assert not list((tmp_path / "dl").rglob("*.pt"))    # read into memory, no cache files
    for entry in remote.shards():
        assert bytes(remote.read_bytes(entry)) == \
            (tmp_path / "local" / entry["file"]).read_bytes()
    assert not _read_ahead_threads()


def test_read_ahead_ends_when_the_reader_stops_early_or_fails(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    _, remote = _both(tmp_path, endpoint, bucket, steps=5, rows=50)
    shards = remote.shards()
    reading = remote.payloads(shards)
    first, payload = next(reading)
    assert first["file"] == shards[0]["file"] and "activations" in payload
    assert len(_read_ahead_threads()) == 1               # the next shard is on its way
    reading.close()                                     # a consumer that stops early
    assert not _read_ahead_threads()
    seen = [e["file"] for e, _ in remote.payloads(shards)]
    assert seen == [e["file"] for e in shards] and not _read_ahead_threads()
    # a shard that fails mid-way: its error at its turn, nothing left running
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.put_object(Bucket=bucket, Key=f"exp/{shards[2]['file']}", Body=b"x" * shards[2]["bytes"])
    out = []
    with pytest.raises(ShardError, match=shards[2]["file"]):
        for entry, _ in remote.payloads(shards):
            out.append(entry["file"])
    assert out == [e["file"] for e in shards[:2]] and not _read_ahead_threads()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_s3_objects_are_caught_by_the_engine(tmp_path, s3_bucket, monkeypatch, damage):
    endpoint, bucket = s3_bucket
    _, remote = _both(tmp_path, endpoint, bucket)
    monkeypatch.setattr(reader, "PART_BYTES", 4096)
    victim = remote.shards()[1]
    key = f"exp/{victim['file']}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    fresh = ShardStore(f"s3://{bucket}/exp", endpoint_url=endpoint, cache_dir=str(tmp_path / "d2"))
    with pytest.raises(ShardError, match=victim["file"]):
        fresh.load(victim)
    with pytest.raises(ShardError, match=victim["file"]):
        Engine(fresh, use_ray=False, progress=False).run(["neuron"])
    assert not _read_ahead_threads()
    np.testing.assert_equal(len(fresh.shards()), 4)


def test_sha256_stores_read_from_s3_into_memory_too(tmp_path, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    local, remote = _both(tmp_path, endpoint, bucket, steps=2, checksum="sha256")
    monkeypatch.setattr(reader, "PART_BYTES", 4096)
    assert all(e["checksum"].startswith("sha256:") for e in remote.shards())
    for entry in remote.shards():
        assert torch.equal(remote.load(entry)["activations"]["1"],
                           local.load(entry["file"])["activations"]["1"])
    assert not list((tmp_path / "dl").rglob("*.pt"))
