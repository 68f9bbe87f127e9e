"""A store is untrusted input (issue 13, storage side): contained paths, one writing run per
store, a rebuildable manifest, verified `inspect`, clean errors."""

import json
import os
import socket
import time
from pathlib import Path

import boto3
import pytest
import torch

from mechray import ActivationSampler, MechIntConfig, ShardError, ShardStore
from mechray.cli import main as cli
from mechray.storage.claim import LOCK, StoreBusyError, StoreClaim
from mechray.storage.manifest import ManifestError
from mechray.storage.reader import cache_root
from mechray.storage.recovery import repair, sync
from mechray.storage.shard import UnsafeNameError, shard_path
from mechray.storage.sink import StorageTarget

OUTSIDE = ["../../../../../../etc/passwd", "/etc/passwd", "sub/activations_shard_000000_step_0.pt",
           "activations_shard_000000_step_0.pt/../../x", "activations_shard_000000_step_0.pt\n",
           "..", "activations_shard_٠٠٠٠٠٠_step_0.pt"]


def _capture(net, d, steps=(0, 10), **kw):
    with ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=False, **kw).attach(net) as s:
        for step in steps:
            net(torch.randn(2, 3, 6))
            s.save_activations(step)
    return s


@pytest.fixture
def store_dir(tiny_net, tmp_path):
    d = tmp_path / "cache"
    _capture(tiny_net, d)
    return d


def _poison(store_dir, name, **extra):
    doc = json.loads((store_dir / "manifest.json").read_text())
    doc["shards"][0] = {**doc["shards"][0], "file": name, **extra}
    (store_dir / "manifest.json").write_text(json.dumps(doc))


# --- 1, 2: contained paths ----------------------------------------------------------------------

@pytest.mark.parametrize("name", OUTSIDE)
def test_shard_path_refuses_anything_but_a_shard_name(tmp_path, name):
    with pytest.raises(UnsafeNameError, match="not a shard file name"):
        shard_path(tmp_path, name)


@pytest.mark.parametrize("name", OUTSIDE[:3])
def test_local_manifest_pointing_outside_is_refused_without_reading(store_dir, name, capsys):
    _poison(store_dir, name)
    with pytest.raises(ManifestError, match="not a shard file name.*repair --rebuild"):
        ShardStore(store_dir)
    assert cli(["ls", str(store_dir)]) == 3  # ShardError's exit status
    err = capsys.readouterr().err
    assert "repair --rebuild" in err and "bytes" not in err and "Traceback" not in err


def test_symlink_out_of_the_store_is_refused(store_dir, tmp_path):
    secret = tmp_path / "secret.pt"
    name = "activations_shard_000001_step_10.pt"
    os.replace(store_dir / name, secret)
    os.symlink(secret, store_dir / name)
    with pytest.raises(UnsafeNameError, match="symlink.*outside the store"):
        ShardStore(store_dir).load(name)


def test_repair_and_sync_never_touch_outside_files(store_dir, tmp_path, s3_bucket):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"not yours")
    _poison(store_dir, str(outside), pending_upload=True)
    with pytest.raises(ManifestError, match="repair --rebuild"):
        repair(store_dir)
    with pytest.raises(ManifestError):
        sync(store_dir, endpoint_url=s3_bucket[0])
    assert outside.read_bytes() == b"not yours" and not (store_dir / ".quarantine").exists()
    report = repair(store_dir, rebuild=True)          # rebuilt from the shards on disk
    assert sorted(report["adopted"]) == sorted(p.name for p in store_dir.glob("*.pt"))
    assert outside.read_bytes() == b"not yours"
    assert len(ShardStore(store_dir).shards()) == 2


def test_s3_manifest_cannot_write_outside_the_cache(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    _capture(tiny_net, tmp_path / "spool", storage_backend="s3", s3_bucket=bucket,
             s3_prefix="exp", s3_endpoint_url=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    doc = json.loads(client.get_object(Bucket=bucket, Key="exp/manifest.json")["Body"].read())
    target = tmp_path / "pwned"
    evil = dict(doc["shards"][0], file="/" + "../" * 12 + str(target).lstrip("/"))
    client.put_object(Bucket=bucket, Key="exp/manifest.json",
                      Body=json.dumps({**doc, "shards": [evil]}).encode())
    with pytest.raises(ManifestError, match="not a shard file name"):
        ShardStore(f"s3://{bucket}/exp", endpoint_url=endpoint, cache_dir=str(tmp_path / "dl"))
    # an entry whose s3_uri names another object is refused before anything is downloaded
    other = dict(doc["shards"][0], s3_uri=f"s3://{bucket}/exp/../elsewhere/x.pt")
    client.put_object(Bucket=bucket, Key="exp/manifest.json",
                      Body=json.dumps({**doc, "shards": [other]}).encode())
    store = ShardStore(f"s3://{bucket}/exp", endpoint_url=endpoint, cache_dir=str(tmp_path / "dl"))
    with pytest.raises(Exception, match="another name: refused"):
        store.load(other["file"])
    # a prefix of '..' still maps to a directory inside the cache
    root = cache_root(tmp_path / "dl", bucket, "..")
    assert root.resolve().is_relative_to((tmp_path / "dl" / "s3").resolve())
    assert not target.exists()
    assert not list(tmp_path.glob("pwned*")) and not list(Path("/tmp").glob("pwned*.lock"))


# --- 3: one writing run per store -----------------------------------------------------------------

def test_second_run_on_a_store_is_refused_then_both_runs_are_kept(tiny_net, tmp_path):
    d = tmp_path / "cache"
    first = ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=False)
    first.register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    first.save_activations(0)
    second = ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=False)
    second.register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    with pytest.raises(StoreBusyError, match=f"run '{first.run_id}'.*pid {os.getpid()}.*"
                                             "another storage_path.*run_id="):
        second.save_activations(0)
    first.close()
    tiny_net(torch.randn(2, 3, 6))
    assert second.save_activations(0) == "activations_shard_000001_step_0.pt"  # numbered after
    second.close()
    store = ShardStore(d)
    assert [(e["file"], e["run_id"]) for e in store.shards()] == [
        ("activations_shard_000000_step_0.pt", first.run_id),
        ("activations_shard_000001_step_0.pt", second.run_id)]
    assert not (d / LOCK).exists()  # released on close


def test_same_run_id_resumes_and_stale_claims_are_taken_over(tmp_path, caplog):
    target = StorageTarget(backend="local", local_dir=str(tmp_path))
    a = StoreClaim(target, "run-a").acquire()
    StoreClaim(target, "run-a").acquire()            # a rank (or resume) of the same run joins
    with pytest.raises(StoreBusyError, match="run 'run-a'"):
        StoreClaim(target, "run-b").acquire()
    held = json.loads((tmp_path / LOCK).read_text())
    a._stop.set()
    # the holder died (same host, no such pid): taken over at once
    (tmp_path / LOCK).write_text(json.dumps({**held, "pid": 2 ** 22 + 17}))
    b = StoreClaim(target, "run-b").acquire()
    assert "its holder is gone" in caplog.text and b.owned
    b._stop.set()
    # another host: alive while its heartbeat is fresh, stale once it stops
    other = {**held, "host": "elsewhere", "heartbeat": time.time()}
    (tmp_path / LOCK).write_text(json.dumps(other))
    with pytest.raises(StoreBusyError, match="host elsewhere"):
        StoreClaim(target, "run-c").acquire()
    (tmp_path / LOCK).write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))
    with pytest.raises(StoreBusyError, match="host elsewhere"):   # judged on the file's mtime,
        StoreClaim(target, "run-c").acquire()                      # not the writer's clock
    os.utime(tmp_path / LOCK, (time.time() - 3600, time.time() - 3600))
    c = StoreClaim(target, "run-c").acquire()
    c.release()
    assert not (tmp_path / LOCK).exists()
    assert cli(["unlock", str(tmp_path)]) == 0


def test_heartbeat_keeps_a_live_claim_fresh(tmp_path):
    target = StorageTarget(backend="local", local_dir=str(tmp_path))
    a = StoreClaim(target, "run-a", stale_after_s=0.5).acquire()
    first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
    time.sleep(0.6)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
    doc = json.loads((tmp_path / LOCK).read_text())
    (tmp_path / LOCK).write_text(json.dumps({**doc, "host": "elsewhere"}))
    time.sleep(0.3)  # beats keep it fresh, so another run is refused
    with pytest.raises(StoreBusyError):
        StoreClaim(target, "run-b", stale_after_s=0.5).acquire()
    a.release()


def test_s3_claim_is_a_conditional_write(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket

    def target(d):
        return StorageTarget(backend="both", local_dir=str(tmp_path / d), bucket=bucket,
                             prefix="shared", endpoint_url=endpoint)

    a = StoreClaim(target("one"), "run-a").acquire()
    key = f"shared/{LOCK}"
    assert json.loads(boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket, Key=key)["Body"].read())["run_id"] == "run-a"
    with pytest.raises(StoreBusyError, match=f"s3://{bucket}/{key}"):
        StoreClaim(target("two"), "run-b").acquire()     # another machine, same prefix
    assert not (tmp_path / "two" / LOCK).exists()        # its local claim was given back
    a.release()
    b = StoreClaim(target("two"), "run-b").acquire()
    b.release()


def test_ray_pool_refuses_a_second_run(ray_local, tiny_net, tmp_path):
    d = tmp_path / "cache"
    first = ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=True)
    first.register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    first.save_activations(0)
    second = ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=True)
    with pytest.raises(StoreBusyError, match=f"run '{first.run_id}'"):
        _ = second.transport
    first.close()
    second.register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    second.save_activations(0)
    second.close()
    assert len(ShardStore(d).shards()) == 2


# --- 7: a rebuildable manifest ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "not_a_list", "entry_not_object"])
def test_damaged_manifest_says_rebuild_and_rebuild_recovers(store_dir, damage, capsys):
    path = store_dir / "manifest.json"
    good = ShardStore(store_dir).shards()
    text = path.read_text()
    doc = json.loads(text)
    bad = {"truncate": text[: len(text) // 2],
           "wrong_shape": json.dumps({**doc, "shards": [{**doc["shards"][0], "layers": "x"}]}),
           "not_a_list": json.dumps({**doc, "shards": {"a": 1}}),
           "entry_not_object": json.dumps({**doc, "shards": [3]})}[damage]
    path.write_text(bad)
    for argv in (["ls", str(store_dir)], ["repair", str(store_dir)]):
        assert cli(argv) == 3
        err = capsys.readouterr().err
        assert f"mechray repair --rebuild {store_dir}" in err and "Traceback" not in err
    assert cli(["repair", "--rebuild", str(store_dir)]) == 0
    assert "set aside" in capsys.readouterr().out
    assert [p.read_text() for p in store_dir.glob("manifest.json.damaged-*")] == [bad]
    rebuilt = ShardStore(store_dir).shards()
    keys = ("file", "index", "rank", "step", "steps", "rows", "layers", "bytes", "checksum")
    assert [{k: e[k] for k in keys} for e in rebuilt] == [{k: e[k] for k in keys} for e in good]
    assert ShardStore(store_dir).read_layer("popt").shape == (12, 8)


# --- 8, 9: inspect verifies, S3 errors are clean, storage_path non-empty, temp files go -------------

def test_inspect_verifies_against_the_manifest(store_dir, capsys):
    name = store_dir / "activations_shard_000001_step_10.pt"
    assert cli(["inspect", str(name)]) == 0
    assert "verified" in capsys.readouterr().out
    data = bytearray(name.read_bytes())
    data[len(data) // 2] ^= 0x01
    name.write_bytes(bytes(data))
    assert cli(["inspect", str(name)]) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    cli(["inspect", "--no-verify", str(name)])  # reads it anyway (may still fail to load)


def test_ls_on_an_unreachable_endpoint_is_one_clean_line(capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    assert cli(["ls", "s3://some-bucket/p", "--endpoint-url", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "S3 request failed" in err and "--endpoint-url" in err and "Traceback" not in err


def test_empty_storage_path_is_refused():
    with pytest.raises(ValueError, match="storage_path is empty"):
        MechIntConfig(sample_layers=["popt"], storage_path="")


def test_repair_removes_a_killed_runs_manifest_temp_file(store_dir):
    stale = store_dir / ".manifest.json.abc123.tmp"
    stale.write_text('{"format": "mechray.manifest", "shards": [')
    report = repair(store_dir)
    assert stale.name in report["removed_temp"] and not stale.exists()


def test_claim_records_host(tmp_path):
    target = StorageTarget(backend="local", local_dir=str(tmp_path))
    claim = StoreClaim(target, "run-h").acquire()
    assert claim.holder().host == socket.gethostname()
    claim.release()


# --- 5: large manifests: parse once per change, list from the head, page entries ----------------

def test_layers_come_from_the_head_and_match_the_entries(tiny_net, tmp_path, monkeypatch):
    import mechray.storage.manifest_format as manifest_mod
    from mechray.storage.summary import Summary

    d = tmp_path / "cache"
    _capture(tiny_net, d, steps=(0, 10, 20, 25))
    parsed = []
    real = manifest_mod.parse
    monkeypatch.setattr(manifest_mod, "parse", lambda text, where: parsed.append(where) or
                        real(text, where))
    store = ShardStore(d)
    layers = store.layers()
    assert parsed == []                                        # no entry parsed to list layers
    assert layers["popt"]["steps"] == [0, 10, 20, 25] and store.count() == 4
    assert cli(["ls", str(d)]) == 0 and parsed == []
    assert layers == {k: v.info() for k, v in Summary(store.shards()).summaries().items()}
    assert parsed[-1].endswith("manifest.json")                # entries parsed on first use


def test_refresh_rereads_only_after_a_change(tiny_net, tmp_path):
    d = tmp_path / "cache"
    _capture(tiny_net, d, steps=(0,))
    store = ShardStore(d)
    assert store.shards() and store.refresh() is False         # unchanged: a stat, no read
    _capture(tiny_net, d, steps=(5,))
    assert store.refresh() is True and store.count() == 2
    assert [e["step"] for e in store.shards()] == [0, 5]


def test_shards_page(tiny_net, tmp_path):
    d = tmp_path / "cache"
    _capture(tiny_net, d, steps=range(0, 50, 10))
    store = ShardStore(d)
    assert [e["step"] for e in store.shards(offset=1, limit=2)] == [10, 20]
    assert [e["step"] for e in store.shards(offset=4, limit=10)] == [40]
    assert store.shards(offset=9, limit=1) == []
    assert store._doc is None                       # pages came from their lines alone
    assert store.shards(offset=1, limit=3) == store.shards()[1:4]
    with pytest.raises(ValueError, match="offset"):
        store.shards(offset=-1)
    lines = (d / "manifest.json").read_text().split("\n")
    at = next(i for i, ln in enumerate(lines) if "_step_20.pt" in ln)
    lines[at] = lines[at].replace("activations_shard_000002_step_20.pt", "../../etc/passwd")
    (d / "manifest.json").write_text("\n".join(lines))
    # edited: no longer what its journal extends, so it is read whole, every entry validated
    with pytest.raises(ManifestError, match="entry 2 names '../../etc/passwd'.*not a shard"):
        ShardStore(d)


def test_hostile_summary_cannot_blow_up_a_reader(store_dir):
    from mechray.storage.summary import layer_summaries

    bomb = {"shards": 1, "bytes": 1, "layers": {"popt": {"feature_shape": [8], "dtype": "float32",
                                                          "shards": 1, "rows": 1,
                                                          "steps": [[0, 10 ** 12, 1]]}}}
    with pytest.raises(ValueError, match="more than"):
        layer_summaries(bomb, "manifest.json")
    with pytest.raises(ValueError, match="summary is not"):
        layer_summaries({"layers": {"popt": {"steps": "x"}}}, "manifest.json")
    backwards = dict(bomb, layers={"popt": dict(bomb["layers"]["popt"],
                                                 steps=[[0, 9, 1], [5, 20, 5]])})
    with pytest.raises(ValueError, match="out of order"):
        layer_summaries(backwards, "manifest.json")


def test_summary_steps_stay_runs_and_behave_as_the_sorted_list():
    import random

    from mechray.storage.summary import Steps, runs

    rng = random.Random(0)
    for _ in range(300):
        listed = sorted(rng.sample(range(80), rng.randint(0, 40)))
        steps = Steps(runs(listed))
        assert steps == listed and list(steps) == listed and len(steps) == len(listed)
        assert [steps[i] for i in range(len(listed))] == listed
        assert [steps[i] for i in range(-len(listed), 0)] == listed
        for a, b, c in ((None, 5, None), (2, -1, None), (-3, None, None), (None, None, 2),
                        (None, None, -1), (7, 3, None)):
            assert steps[a:b:c] == listed[a:b:c], (listed, a, b, c)
    huge = Steps([[0, 10 ** 7 - 1, 1], [10 ** 7 + 4, 10 ** 8, 4]])
    assert len(huge) == 10 ** 7 + (10 ** 8 - 10 ** 7 - 4) // 4 + 1
    assert huge[-1] == 10 ** 8 and huge[10 ** 7] == 10 ** 7 + 4 and huge[:3] == [0, 1, 2]
    with pytest.raises(IndexError, match="out of range"):
        huge[len(huge)]


def test_version_moves_with_the_manifest(tiny_net, tmp_path):
    d = tmp_path / "cache"
    _capture(tiny_net, d, steps=(0,))
    store = ShardStore(d)
    v = store.version
    assert store.refresh() is False and store.version == v
    _capture(tiny_net, d, steps=(1,))
    assert store.refresh() is True and store.version != v


def test_s3_stall_says_what_it_waits_for_and_loses_nothing(tiny_net, tmp_path, caplog,
                                                          monkeypatch):
    import logging

    import mechray.storage.transport as transport

    monkeypatch.setattr(transport, "STALL_LOG_S", 0.2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    caplog.set_level(logging.INFO)
    d = tmp_path / "cache"
    s = _capture(tiny_net, d, steps=(0, 1, 2), storage_backend="both", s3_bucket="nowhere",
                 s3_endpoint_url="http://127.0.0.1:1", s3_retry_seconds=1.0)
    assert s.stats.pending_uploads == 3
    # S3 was down at start: the prefix is not claimed, so no shard waits for it (one budget,
    # spent on the claim) and the uploads wait for `mechray sync`, said with the prefix
    assert "still waiting for" not in caplog.text and "s3://nowhere/" in caplog.text
    assert "3 shard(s) stay in" in caplog.text and f"mechray sync {d}" in caplog.text
    entries = ShardStore(d).shards()
    assert len(entries) == 3 and all(e["pending_upload"] for e in entries)


def test_rebuild_refuses_an_s3_only_store_whose_shards_are_not_here(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "mechray.manifest", "config": '
                                            '{"storage_backend": "s3", "s3_bucket": "b", '
                                            '"s3_prefix": "p"}, "shards": [')
    with pytest.raises(ShardError, match="s3://b/p, not here"):
        repair(tmp_path, rebuild=True)
    assert (tmp_path / "manifest.json").exists()   # nothing set aside
