"""Ray Train workers and multi-node clusters (one machine, real Ray processes)."""

import json
import sys
from pathlib import Path

import pytest

from mechray import ShardStore

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _example(name):
    """Import an example module; Ray workers get its functions by value (they cannot import it)."""
    from ray import cloudpickle

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    cloudpickle.register_pickle_by_value(module)
    return module


def test_ray_train_workers_share_one_pool_and_one_manifest(ray_local, tmp_path):
    ray_train_capture = _example("ray_train_capture")
    config = ray_train_capture.run(str(tmp_path), workers=2, steps=9, every=4)
    cache = Path(config["storage_path"])
    assert not list(cache.glob("manifest.rank*.json"))
    manifest = json.loads((cache / "manifest.json").read_text())
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert files == sorted(f"activations_rank{r:03d}_shard_{i:06d}_step_{s}.pt"
                           for r in (0, 1) for i, s in enumerate([0, 4, 8]))
    assert sorted(e["file"] for e in manifest["shards"]) == files
    store = ShardStore(cache)
    for entry in store.shards():
        payload = store.load(entry)
        assert payload["metadata"]["world_size"] == 2
        assert entry["rows"]["popt"] == 8
