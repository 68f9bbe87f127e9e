"""A store is data, never a path to follow (issue 19, defects 7 and 8): repair, rebuild, ls and
the API's reader open only regular files inside the store, read at most what a shard declares,
check metadata types, and replace a manifest only once the new one is complete.

Commands that hung or read without bound before run in a child process with a time limit and an
address-space limit, so the old behaviour fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from mechray import ActivationSampler, ShardStore
from mechray.cli import main as cli
from mechray.storage import recovery
from mechray.storage.recovery import repair

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_dir(tiny_net, tmp_path):
    d = tmp_path / "cache"
    with ActivationSampler(layers=["popt"], save_dir=str(d), use_ray=False).attach(tiny_net) as s:
        for step in (0, 10, 20):
            tiny_net(torch.randn(3, 4, 6))
            s.save_activations(step)
    return d


def _child(code: str, timeout: float = 60, memory_gb: int = 4) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, at most ``timeout`` s and ``memory_gb`` of address
    space (TimeoutExpired fails the test: the old code hung there)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, env=env, cwd=str(ROOT))


_CLI = "import sys; from mechray.cli import main; sys.exit(main({argv!r}))"
_LAYERS = ("from mechray.api.store_view import StoreView; from mechray import MechIntConfig\n"
           "from mechray.api.errors import ApiError\n"
           "view = StoreView({path!r}, MechIntConfig(sample_layers=['*'], storage_path={path!r}))\n"
           "try:\n    view.layers_json(); print('SERVED')\n"
           "except ApiError as exc:\n    print('STATUS', exc.status)\n")


def _orphan(store_dir: Path, payload: dict, index: int = 7, step: int = 70) -> Path:
    name = f"activations_shard_{index:06d}_step_{step}.pt"
    payload["metadata"]["file"] = name
    torch.save(payload, store_dir / name)
    return store_dir / name


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_manifest_that_is_no_file_is_refused_at_once(store_dir, kind):
    (store_dir / "manifest.json").unlink()
    if kind == "fifo":
        os.mkfifo(store_dir / "manifest.json")
    else:
        os.symlink("/dev/zero", store_dir / "manifest.json")
    ls = _child(_CLI.format(argv=["ls", str(store_dir)]), timeout=60, memory_gb=2)
    assert ls.returncode == 3, ls.stderr[-2000:]
    assert "manifest.json" in ls.stderr and "Traceback" not in ls.stderr
    assert ("FIFO" if kind == "fifo" else "symbolic link") in ls.stderr
    served = _child(_LAYERS.format(path=str(store_dir)), timeout=60, memory_gb=4)
    assert "STATUS 503" in served.stdout, served.stderr[-2000:]       # /interpret/layers
    rebuilt = _child(_CLI.format(argv=["repair", "--rebuild", str(store_dir)]), timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert not (store_dir / "manifest.json").is_symlink()
    assert len(ShardStore(store_dir).shards()) == 3


def test_a_sparse_giant_named_like_a_shard_is_refused_without_reading_it(store_dir):
    giant = store_dir / "activations_shard_000009_step_90.pt"
    with open(giant, "wb") as fh:
        fh.truncate(256 << 20)                        # sparse: takes no disk, reads as zeros
    tracemalloc.start()
    try:
        report = repair(store_dir, rebuild=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert giant.name in report["quarantined"] and peak < 32 << 20
    assert (store_dir / ".quarantine" / giant.name).is_file()
    assert len(ShardStore(store_dir).shards()) == 3


def test_a_deflated_shard_inflating_past_its_size_is_refused(store_dir):
    payload = torch.load(store_dir / "activations_shard_000000_step_0.pt", weights_only=True)
    payload["activations"]["popt"] = torch.zeros(200_000, 8)      # 6.4 MB of zeros
    plain = _orphan(store_dir, payload)
    deflated = plain.with_name(plain.name + ".zip")
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for info in zin.infolist():
            z.writestr(info.filename, zin.read(info))
    os.replace(deflated, plain)
    assert plain.stat().st_size < 200_000
    assert torch.load(plain, weights_only=True)["activations"]["popt"].shape == (200_000, 8)
    report = repair(store_dir)
    assert plain.name in report["quarantined"] and plain.name not in report["adopted"]
    assert [e["file"] for e in ShardStore(store_dir).shards() if e["file"] == plain.name] == []


@pytest.mark.parametrize("rebuild", [False, True])
def test_metadata_of_the_wrong_type_is_a_reported_bad_shard(store_dir, rebuild):
    payload = torch.load(store_dir / "activations_shard_000000_step_0.pt", weights_only=True)
    payload["metadata"]["shard_index"] = "abc"
    bad = _orphan(store_dir, payload)
    report = repair(store_dir, rebuild=rebuild)
    assert bad.name in report["quarantined"] and report["shards"] == 3
    assert len(ShardStore(store_dir).shards()) == 3
    assert (store_dir / ".quarantine" / bad.name).is_file()


def test_a_symlinked_quarantine_is_refused_and_nothing_outside_moves(store_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "activations_shard_000001_step_10.pt"
    victim.write_text("keep me")
    os.symlink(outside, store_dir / ".quarantine")
    shard = store_dir / "activations_shard_000001_step_10.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1                                      # fails its checksum
    shard.write_bytes(bytes(data))
    for rebuild in (False, True):
        assert cli(["repair", *(["--rebuild"] if rebuild else []), str(store_dir)]) == 3
    assert victim.read_text() == "keep me" and sorted(p.name for p in outside.iterdir()) == \
        [victim.name]
    assert shard.is_file()                                          # not moved anywhere
    (store_dir / ".quarantine").unlink()
    report = repair(store_dir)
    assert shard.name in report["quarantined"] and (store_dir / ".quarantine").is_dir()
    assert victim.read_text() == "keep me"


def test_a_rebuild_that_dies_midway_leaves_the_old_manifest(store_dir, monkeypatch):
    before = (store_dir / "manifest.json").read_bytes()
    real, seen = recovery._entry_if_complete, []

    def dies_on_the_second(*args, **kwargs):
        seen.append(args[0])
        if len(seen) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(recovery, "_entry_if_complete", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        repair(store_dir, rebuild=True)
    assert (store_dir / "manifest.json").read_bytes() == before
    assert len(ShardStore(store_dir).shards()) == 3


def test_a_listed_shard_replaced_by_a_fifo_is_dropped_not_waited_on(store_dir):
    name = "activations_shard_000002_step_20.pt"
    (store_dir / name).unlink()
    os.mkfifo(store_dir / name)
    out = _child("from mechray.storage.recovery import repair; import json, sys\n"
                 f"print(json.dumps(repair({str(store_dir)!r})))", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["shards"] == 2
