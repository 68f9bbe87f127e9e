"""Manifest format 2: group commits append to a journal (O(new entries)), readers take the head
from its last commit, close/repair fold it into manifest.json, version-1 stores still read."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from mechray import ActivationSampler, ShardStore
from mechray.storage import manifest as mf
from mechray.storage.manifest import Manifest, read_head
from mechray.storage.recovery import repair
from mechray.storage.sink import StorageTarget

DIGEST = "crc32c:0123abcd"


def _entry(i: int, rows: int = 16) -> dict:
    return {"file": f"activations_shard_{i:06d}_step_{i * 10}.pt", "index": i, "rank": 0,
            "world_size": 1, "step": i * 10, "steps": [i * 10],
            "rows": {"a": rows, "b": rows},
            "layers": {"a": {"shape": [rows, 4], "dtype": "float32"},
                       "b": {"shape": [rows, 2], "dtype": "float16"}},
            "bytes": 1000 + i, "checksum": DIGEST, "s3_uri": None}


@pytest.fixture
def owner(tmp_path, monkeypatch):
    owner = Manifest(StorageTarget(backend="local", local_dir=str(tmp_path)), {"k": 1})
    owner.add(*[_entry(i) for i in range(200)])          # first commit: manifest.json whole
    monkeypatch.setattr(mf, "COMPACT_BELOW", 0)          # from now on, as a large store would
    return owner


def test_a_group_commit_appends_its_entries_only(owner, tmp_path):
    main = tmp_path / "manifest.json"
    before, journal = main.stat(), (tmp_path / "manifest.journal").stat().st_size
    owner.add(_entry(200, rows=99))
    after = main.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)     # not rewritten
    grew = (tmp_path / "manifest.journal").stat().st_size - journal
    assert 0 < grew < 2000 < before.st_size                     # one entry and a commit line
    head = read_head(tmp_path)
    assert head is not None and head.records == 1 and head.shards == 201
    assert head.layers["a"].max_shard_rows == 99 and head.layers["a"].rows == 200 * 16 + 99
    store = ShardStore(tmp_path)
    assert store.count() == 201 and store._doc is None          # listed from the head alone
    assert store.layers()["b"]["steps"][-1] == 2000
    assert [e["index"] for e in store.shards()][-2:] == [199, 200]
    owner.remove(_entry(3)["file"])
    assert store.refresh() and store.count() == 200 and \
        _entry(3)["file"] not in {e["file"] for e in store.shards()}


def test_the_journal_is_folded_in_when_it_outgrows_a_quarter_or_on_close(owner, tmp_path):
    main = tmp_path / "manifest.json"
    ino = main.stat().st_ino
    added = 200
    while main.stat().st_ino == ino:
        owner.add(_entry(added))
        added += 1
        assert added < 300
    assert 210 <= added <= 260     # journal (entries + commit lines) past a quarter of the manifest
    owner.add(_entry(added))
    assert read_head(tmp_path).records == 1
    owner.close()
    doc = json.loads(main.read_text())                          # a readable index of every shard
    assert doc["version"] == 2 and len(doc["shards"]) == added + 1
    assert read_head(tmp_path).records == 0
    assert ShardStore(tmp_path).shards(offset=added, limit=5)[0]["index"] == added


def test_concurrent_adds_share_commits_and_lose_nothing(owner, tmp_path):
    def work(k: int) -> None:
        for j in range(25):
            owner.add(_entry(1000 + k * 25 + j))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    files = {e["file"] for e in ShardStore(tmp_path).shards()}
    assert len(files) == 300 and {_entry(1099)["file"], _entry(1000)["file"]} <= files
    again = Manifest(StorageTarget(backend="local", local_dir=str(tmp_path)), {"k": 1})
    assert len(again.entries()) == 300


def test_a_torn_append_is_not_committed(owner, tmp_path):
    owner.add(_entry(200))
    with open(tmp_path / "manifest.journal", "ab") as fh:     # a writer killed mid-append
        fh.write(b'{"add":' + json.dumps(_entry(201)).encode() + b'}\n{"add": {"file"')
    store = ShardStore(tmp_path)
    assert store.count() == 201 and len(store.shards()) == 201
    again = Manifest(StorageTarget(backend="local", local_dir=str(tmp_path)), {"k": 1})
    again.add(_entry(202))                                      # rewrites whole: journal healed
    assert [e["index"] for e in ShardStore(tmp_path).shards()][-2:] == [200, 202]
    assert read_head(tmp_path).records == 0


def test_a_version_1_store_reads_and_repair_upgrades_it(tiny_net, tmp_path):
    d = tmp_path / "cache"
    with ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=False).attach(tiny_net) as s:
        for step in (0, 10):
            tiny_net(torch.randn(3, 4, 6))
            s.save_activations(step)
    doc = json.loads((d / "manifest.json").read_text())
    v1 = {"format": mf.FORMAT, "version": 1, "created": doc["created"],
          "updated": doc["updated"], "config": doc["config"], "shards": doc["shards"]}
    (d / "manifest.json").write_text(json.dumps(v1, indent=1))  # as mechray 1 wrote it
    os.remove(d / "manifest.journal")
    store = ShardStore(d)
    assert store.count() == 2 and store.layers()["popt"]["shards"] == 2
    assert read_head(d) is None                                 # no head: read whole
    report = repair(d)
    assert report["shards"] == 2
    assert json.loads((d / "manifest.json").read_text())["version"] == 2
    assert read_head(d) is not None and ShardStore(d).read_layer("popt").shape == (24, 8)


def test_on_s3_the_journal_travels_beside_the_manifest_until_folded(tmp_path, s3_bucket,
                                                                    monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    target = StorageTarget(backend="both", local_dir=str(tmp_path), bucket=bucket, prefix="exp",
                           endpoint_url=endpoint, retry_seconds=5.0)
    owner = Manifest(target, {"k": 1})
    owner.add(*[_entry(i) for i in range(50)])
    monkeypatch.setattr(mf, "COMPACT_BELOW", 0)
    for i in range(50, 53):
        owner.add(_entry(i))                                    # appended, journal uploaded
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="exp/")["Contents"]}
    assert keys == {"exp/manifest.json", "exp/manifest.journal"}
    remote = ShardStore(f"s3://{bucket}/exp", endpoint_url=endpoint,
                        cache_dir=str(tmp_path / "dl"))
    assert remote.count() == 53 and remote.layers()["a"]["shards"] == 53
    owner.close()                                               # folded: one manifest.json
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="exp/")["Contents"]}
    assert keys == {"exp/manifest.json"}
    assert remote.refresh() and [e["index"] for e in remote.shards()] == list(range(53))


def test_the_api_view_sees_a_commit_that_only_appended(owner, tmp_path):
    from mechray import MechIntConfig
    from mechray.api.store_view import StoreView

    view = StoreView(str(tmp_path), MechIntConfig(sample_layers=["*"], storage_path=str(tmp_path)))
    assert json.loads(view.layers_json())["layers"]["a"]["shards"] == 200
    owner.add(_entry(200, rows=40))                            # manifest.json untouched
    assert json.loads(view.layers_json())["layers"]["a"]["shards"] == 201
    assert view.shard_rows("a") == 40                          # from the head, no entry read
    assert view.snapshot().store._doc is None


def test_the_summary_keeps_step_runs_right_in_any_order():
    import random

    from mechray.storage.summary import Summary, expand

    rng = random.Random(0)
    for _ in range(200):
        summary, entries = Summary(), []
        for i in range(rng.randint(1, 30)):
            steps = sorted(rng.sample(range(0, 200, rng.choice([1, 5, 10])), rng.randint(1, 3))) \
                if rng.random() < 0.3 else [i * rng.choice([1, 10])]
            entry = {**_entry(i), "step": steps[0], "steps": steps}
            entries.append(entry)
            summary.add(entry)
            if rng.random() < 0.1:
                summary.remove(entries.pop(rng.randrange(len(entries))))
            runs = summary.to_json()["layers"].get("a", {}).get("steps", [])
            assert expand(runs) == sorted({s for e in entries for s in e["steps"]})
