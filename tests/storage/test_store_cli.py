"""Reading stores: integrity errors that name the shard, no pickled code, and the CLI."""

import json
import os

import pytest
import torch

from mechray import ActivationSampler, ShardError, ShardStore
from mechray.cli import main as cli
from mechray.storage.shard import checksum


@pytest.fixture
def store_dir(tiny_net, tmp_path):
    d = tmp_path / "cache"
    with ActivationSampler(layers=["popt", "heads.decoder"], save_dir=str(d),
                           use_ray=False).attach(tiny_net) as s:
        for step in (0, 10, 20):
            tiny_net(torch.randn(3, 4, 6))
            s.save_activations(step)
    return d


def test_store_lists_layers_steps_and_shards(store_dir):
    store = ShardStore(store_dir)
    assert store.layers()["popt"] == {"feature_shape": [8], "dtype": "float32", "shards": 3,
                                      "rows": 36, "steps": [0, 10, 20],
                                      "dropped_rows": 0, "provenance_shards": 0}
    assert store.layers()["heads.decoder"]["feature_shape"] == [3]
    assert store.steps() == [0, 10, 20]
    assert [rows.shape[0] for _, rows in store.iter_layer("popt")] == [12, 12, 12]
    assert store.read_layer("popt", max_rows=20).shape == (20, 8)
    with pytest.raises(KeyError, match="did you mean popt"):
        store.check_layer("pop")


def test_bit_flip_is_detected_and_named(store_dir):
    name = "activations_shard_000001_step_10.pt"
    data = bytearray((store_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (store_dir / name).write_bytes(bytes(data))
    store = ShardStore(store_dir)
    with pytest.raises(ShardError, match=f"{name}.*does not match its checksum"):
        list(store.iter_layer("popt"))


def test_truncated_and_missing_shards_are_named(store_dir):
    name = "activations_shard_000002_step_20.pt"
    with open(store_dir / name, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ShardError, match=f"{name}.*truncated"):
        ShardStore(store_dir).load(name)
    os.remove(store_dir / name)
    with pytest.raises(ShardError, match=f"{name}.*missing"):
        ShardStore(store_dir).load(name)


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no manifest.json.*storage_path"):
        ShardStore(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MECHRAY_PWNED']}",))


def test_pickled_code_in_a_shard_never_runs(store_dir, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MECHRAY_PWNED", str(marker))
    name = "activations_shard_000000_step_0.pt"
    torch.save({"activations": {"popt": torch.zeros(2, 8)}, "metadata": {"x": _Evil()}},
               store_dir / name)
    blob = (store_dir / name).read_bytes()
    manifest = json.loads((store_dir / "manifest.json").read_text())
    for e in manifest["shards"]:
        if e["file"] == name:
            e["bytes"], e["checksum"] = len(blob), checksum(blob)
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=name):
        ShardStore(store_dir).load(name)
    assert cli(["inspect", str(store_dir / name)]) == 2
    assert not marker.exists()


def test_cli_ls_and_inspect(store_dir, capsys):
    assert cli(["ls", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s)" in out and "popt" in out and "heads.decoder" in out
    assert cli(["inspect", str(store_dir / "activations_shard_000001_step_10.pt")]) == 0
    out = capsys.readouterr().out
    assert '"step": 10' in out and "shape=[12, 8]" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["ls", str(tmp_path / "nowhere")]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_shards_and_manifest_are_readable_by_other_users(store_dir):
    for path in [store_dir / "manifest.json", *store_dir.glob("*.pt")]:
        assert path.stat().st_mode & 0o044 == 0o044, path
