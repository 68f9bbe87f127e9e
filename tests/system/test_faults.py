"""Faults in the core path: S3 down mid-run, disk full, a SIGKILLed trainer, a crashed writer."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from torch import nn

from mechray import ActivationSampler, ShardStore, ShardWriteError
from mechray.cli import main as cli
from mechray.storage.recovery import repair
from mechray.testing import LocalS3

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def flaky_s3():
    s3 = LocalS3()
    bucket = s3.create_bucket(f"flaky-{uuid.uuid4().hex[:8]}")
    yield s3, bucket
    s3.stop()


def _keys(url, bucket, prefix):
    listed = boto3.client("s3", endpoint_url=url).list_objects_v2(Bucket=bucket, Prefix=prefix)
    # the run's claim (.mechray.lock) may outlive an outage: it turns stale by itself
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])
                  if not o["Key"].endswith("/.mechray.lock"))


def _sampler(path, url, bucket, **extra):
    model = nn.Sequential(nn.Linear(8, 16))
    s = ActivationSampler(layers=["0"], save_dir=str(path), storage_backend="s3",
                          s3_bucket=bucket, s3_prefix="run", s3_endpoint_url=url,
                          s3_retry_seconds=0.5, use_ray=False, **extra)
    s.register_hooks(model)
    return s, model


def test_s3_outage_spools_then_sync_finishes(flaky_s3, tmp_path):
    s3, bucket = flaky_s3
    s, model = _sampler(tmp_path, s3.url, bucket)
    names = []
    for step in range(2):
        model(torch.randn(4, 8))
        names.append(s.save_activations(step))
    s.flush()
    s3.stop()                                   # the endpoint goes down mid-run
    for step in range(2, 5):
        model(torch.randn(4, 8))
        names.append(s.save_activations(step))  # training is not stopped
    s.close()                                   # close retries once; still down
    local = json.loads((tmp_path / "manifest.json").read_text())
    pending = sorted(e["file"] for e in local["shards"] if e.get("pending_upload"))
    assert pending == names[2:]
    assert sorted(p.name for p in (tmp_path / ".spool").glob("*.pt")) == names[2:]
    assert [e["file"] for e in local["shards"]] == names  # every shard listed (durable locally)

    s3.start()
    assert cli(["sync", str(tmp_path)]) == 0
    assert _keys(s3.url, bucket, "run/") == sorted(names + ["manifest.json"])
    assert not list((tmp_path / ".spool").glob("*.pt"))
    store = ShardStore(f"s3://{bucket}/run", endpoint_url=s3.url, cache_dir=str(tmp_path / "dl"))
    assert [e["file"] for e in store.shards()] == names
    assert not any(e.get("pending_upload") for e in store.shards())
    assert store.read_layer("0").shape == (5 * 4, 16)


def test_s3_back_before_close_uploads_on_close(flaky_s3, tmp_path):
    s3, bucket = flaky_s3
    s, model = _sampler(tmp_path, s3.url, bucket)
    s3.stop()
    model(torch.randn(4, 8))
    name = s.save_activations(0)
    s.flush()
    assert s.stats.pending_uploads == 1
    s3.start()
    s.close()
    assert s.stats.pending_uploads == 0
    assert _keys(s3.url, bucket, "run/") == sorted([name, "manifest.json"])


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(sampler, model, steps):
    names = []
    for step in steps:
        model(torch.randn(1000, 8))  # ~130 KB per shard
        names.append(sampler.save_activations(step))
        sampler.flush() if sampler.config.on_write_error == "drop" else None
    return names


def test_disk_full_stops_training_and_names_the_path(tiny_disk):
    model = nn.Sequential(nn.Linear(8, 32))
    s = ActivationSampler(layers=["0"], save_dir=str(tiny_disk / "cache"), use_ray=False,
                          max_shards_in_flight=1, num_writers=1)
    s.register_hooks(model)
    with pytest.raises(ShardWriteError) as info:
        for step in range(100):
            model(torch.randn(1000, 8))
            s.save_activations(step)
    msg = str(info.value)
    assert "no space left on" in msg and str(tiny_disk / "cache") in msg
    assert "kept" in msg and "retry_failed" in msg
    with pytest.raises(ShardWriteError):
        s.flush()  # let the shard still in flight settle (it cannot fit either)
    # every shard handed off is either durable or still in memory: none is lost
    assert s.transport.failed
    assert s.stats.shards_written + len(s.transport.failed) == s.stats.shards_submitted
    kept = ShardStore(tiny_disk / "cache").shards()
    assert kept and all(ShardStore(tiny_disk / "cache").load(e) for e in kept)
    s.remove_hooks()


def test_disk_full_can_drop_capture_loudly(tiny_disk, caplog):
    model = nn.Sequential(nn.Linear(8, 32))
    s = ActivationSampler(layers=["0"], save_dir=str(tiny_disk / "cache"), use_ray=False,
                          max_shards_in_flight=1, num_writers=1, on_write_error="drop")
    s.register_hooks(model)
    _fill(s, model, range(30))                   # training goes on
    s.close()
    assert s.stats.shards_dropped > 0
    assert s.stats.shards_written + s.stats.shards_dropped == 30
    assert "DROPPED shard" in caplog.text and "no space left" in caplog.text
    assert len(ShardStore(tiny_disk / "cache").shards()) == s.stats.shards_written


@pytest.mark.slow
def test_sigkilled_trainer_leaves_a_consistent_store(tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/capture_forever.py"),
                             str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 6:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("the capture never wrote 6 shards")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = ShardStore(out)
    listed = store.shards()
    for entry in listed:                     # nothing partial is listed
        assert store.load(entry)["activations"]["1"].shape == (2048, 512)
    report = repair(out)
    on_disk = sorted(p.name for p in out.glob("activations_*.pt"))
    store.refresh()
    assert sorted(e["file"] for e in store.shards()) == on_disk
    assert not list(out.glob(".activations_*.tmp"))
    assert len(on_disk) == len(listed) + len(report["adopted"]) + len(report["salvaged"])
    resumed = ActivationSampler(layers=["0"], save_dir=str(out), use_ray=False)
    assert resumed.transport.start() == max(e["index"] for e in store.shards()) + 1
    resumed.close()


def test_repair_adopts_salvages_and_quarantines(tiny_net, tmp_path):
    out = tmp_path / "cache"
    with ActivationSampler(layers=["popt"], save_dir=str(out), use_ray=False).attach(tiny_net) as s:
        for step in range(6):
            tiny_net(torch.randn(2, 3, 6))
            s.save_activations(step)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [e["file"] for e in manifest["shards"]]
    # killed before the manifest update: a complete shard the manifest does not list
    manifest["shards"] = [e for e in manifest["shards"] if e["file"] != names[5]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    # killed between fsync and rename: a complete temp file
    os.replace(out / names[4], out / f".{names[4]}.k2j3.tmp")
    # killed mid-write: a partial temp file of a shard that never landed
    (out / ".activations_shard_000009_step_9.pt.zz.tmp").write_bytes(b"PK\x03\x04partial")
    # a listed shard whose bytes were altered, and one that vanished
    data = bytearray((out / names[1]).read_bytes())
    data[-100] ^= 0xFF
    (out / names[1]).write_bytes(bytes(data))
    (out / names[2]).unlink()

    report = repair(out)
    assert report["adopted"] == [names[5]]
    assert report["salvaged"] == [names[4]]
    assert report["removed_temp"] == [".activations_shard_000009_step_9.pt.zz.tmp"]
    assert report["quarantined"] == [names[1]] and (out / ".quarantine" / names[1]).exists()
    assert report["missing"] == [names[2]]
    store = ShardStore(out)
    assert [e["file"] for e in store.shards()] == [names[0], names[3], names[4], names[5]]
    for e in store.shards():
        store.load(e)
    assert repair(out)["adopted"] == []  # idempotent
