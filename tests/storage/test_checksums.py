"""Shard checksums: CRC32C streamed by default, sha256 on request, old sha256 stores still read,
flipped bits caught with a hint, and S3 uploads that carry a checksum S3 verifies."""

import base64
import json
import zlib

import crc32c
import pytest
import torch

from mechray import ActivationSampler, MechIntConfig, ShardError, ShardStore
from mechray.errors import ConfigError
from mechray.storage import recovery, s3
from mechray.storage.shard import checksum, file_checksum


def _capture(net, path, steps=(0, 5, 10), **fields):
    with ActivationSampler(layers=["popt", "embed"], save_dir=str(path), use_ray=False,
                           verbose=False, **fields).attach(net) as s:
        for step in steps:
            net(torch.randn(3, 4, 6))
            s.save_activations(step)


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x04
    path.write_bytes(bytes(data))


def test_new_shards_carry_a_crc32c_of_their_bytes_and_verify_on_read(tiny_net, tmp_path):
    _capture(tiny_net, tmp_path / "c")
    store = ShardStore(tmp_path / "c")
    for entry in store.shards():
        data = (tmp_path / "c" / entry["file"]).read_bytes()
        assert entry["checksum"] == f"crc32c:{crc32c.crc32c(data):08x}"
        assert file_checksum(tmp_path / "c" / entry["file"], entry["checksum"]) == entry["checksum"]
        assert store.load(entry["file"])["activations"]["popt"].shape == (12, 8)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["config"]["checksum"] == \
        "crc32c"


@pytest.mark.parametrize("where", [0.02, 0.5, 0.999])
def test_a_flipped_bit_anywhere_is_caught_naming_the_shard_and_repair(tiny_net, tmp_path, where):
    _capture(tiny_net, tmp_path / "c")
    name = "activations_shard_000001_step_5.pt"
    _flip(tmp_path / "c" / name, where)
    store = ShardStore(tmp_path / "c")
    with pytest.raises(ShardError, match=f"{name}.*does not match its checksum crc32c:.*"
                                         f"mechray repair"):
        store.load(name)
    assert store.load("activations_shard_000000_step_0.pt")["activations"]["popt"].shape[0] == 12
    report = recovery.repair(tmp_path / "c")                  # quarantined, the rest kept
    assert [p.rsplit("/", 1)[-1] for p in report["quarantined"]] == [name]
    assert sorted(e["file"] for e in ShardStore(tmp_path / "c").shards()) == [
        "activations_shard_000000_step_0.pt", "activations_shard_000002_step_10.pt"]


def test_sha256_stays_an_option_with_classic_zip_crcs(tiny_net, tmp_path):
    import zipfile

    _capture(tiny_net, tmp_path / "s", checksum="sha256")
    store = ShardStore(tmp_path / "s")
    entry = store.shards()[0]
    path = tmp_path / "s" / entry["file"]
    assert entry["checksum"] == checksum(path.read_bytes(), "sha256")
    assert entry["checksum"].startswith("sha256:") and len(entry["checksum"]) == 7 + 64
    assert zipfile.ZipFile(path).testzip() is None            # every zip record's CRC-32 valid
    _flip(path)
    with pytest.raises(ShardError, match="does not match its checksum sha256:"):
        ShardStore(tmp_path / "s").load(entry["file"])


def test_a_store_written_before_crc32c_still_reads_and_verifies(tiny_net, tmp_path):
    """An old store: files from plain torch.save, manifest entries with sha256 digests."""
    _capture(tiny_net, tmp_path / "old")
    root = tmp_path / "old"
    doc = json.loads((root / "manifest.json").read_text())
    for entry in doc["shards"]:  # rewrite each file exactly as the old writer did
        payload = torch.load(root / entry["file"], weights_only=True)
        torch.save(payload, root / entry["file"])
        data = (root / entry["file"]).read_bytes()
        entry["bytes"], entry["checksum"] = len(data), "sha256:" + __import__(
            "hashlib").sha256(data).hexdigest()
    doc["config"].pop("checksum")
    (root / "manifest.json").write_text(json.dumps(doc))
    store = ShardStore(root)
    assert [rows.shape[0] for _, rows in store.iter_layer("popt")] == [12, 12, 12]
    _flip(root / "activations_shard_000002_step_10.pt")
    with pytest.raises(ShardError, match="000002_step_10.*sha256:.*mechray repair"):
        ShardStore(root).load("activations_shard_000002_step_10.pt")


def test_unknown_checksum_is_a_config_error():
    with pytest.raises(ConfigError, match="checksum"):
        MechIntConfig(sample_layers=["popt"], checksum="md5")
    with pytest.raises(ConfigError, match="s3_checksum_algorithm"):
        MechIntConfig(sample_layers=["popt"], s3_checksum_algorithm="MD5")


def test_s3_uploads_carry_the_crc32_of_the_bytes_for_s3_to_check(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    _capture(tiny_net, tmp_path / "c", steps=(0, 1), storage_backend="both", s3_bucket=bucket,
             s3_prefix="crc", s3_endpoint_url=endpoint)
    client = s3.client(endpoint)
    for entry in ShardStore(tmp_path / "c").shards():
        head = client.head_object(Bucket=bucket, Key=f"crc/{entry['file']}",
                                  ChecksumMode="ENABLED")
        data = (tmp_path / "c" / entry["file"]).read_bytes()
        expected = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        assert head["ChecksumCRC32"] == expected
    head = client.head_object(Bucket=bucket, Key="crc/manifest.json", ChecksumMode="ENABLED")
    assert "ChecksumCRC32" in head


def test_a_crc32c_shard_is_accepted_as_an_upload(tiny_net, tmp_path):
    """The zip records' CRC-32 fields of a CRC32C shard are 0; the upload parser reads it."""
    from mechray.api import uploads

    _capture(tiny_net, tmp_path / "c", steps=(0,))
    data = (tmp_path / "c" / "activations_shard_000000_step_0.pt").read_bytes()
    upload = uploads.parse_upload(data, "shard.pt", max_layers=64)
    assert upload.kind == "pt"
