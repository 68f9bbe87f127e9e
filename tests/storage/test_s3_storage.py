"""S3 and 'both' backends against a real HTTP S3 server (moto on 127.0.0.1) through boto3."""

import json

import boto3
import pytest
import torch

from mechray import MechIntHooks, ShardStore
from mechray.cli import main as cli


def _capture(tiny_net, tmp_path, endpoint, bucket, backend, steps=(0, 5, 10), **extra):
    config = {"sample_layers": ["mamba_backbone.blocks.1", "popt"], "storage_backend": backend,
              "storage_path": str(tmp_path / "cache"), "s3_bucket": bucket,
              "s3_prefix": "exp001/activations", "s3_endpoint_url": endpoint, "use_ray": False,
              **extra}
    expected = {}
    with MechIntHooks(config).attach(tiny_net) as hooks:
        for step in steps:
            x = torch.randn(4, 5, 6)
            tiny_net(x)
            name = hooks.sampler.save_activations(step)
            hooks.sampler.enabled = False  # recompute the expected rows without capturing them
            h = tiny_net.embed(x)
            h = h + tiny_net.mamba_backbone.blocks[0](h)
            expected[name] = tiny_net.mamba_backbone.blocks[1](h).detach().reshape(-1, 8)
            hooks.sampler.enabled = True
    return expected


def _keys(endpoint, bucket, prefix="exp001/activations/"):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_s3_backend_uploads_shards_and_manifest(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    expected = _capture(tiny_net, tmp_path, endpoint, bucket, "s3")
    keys = _keys(endpoint, bucket)
    assert keys == sorted([f"exp001/activations/{n}" for n in expected] +
                          ["exp001/activations/manifest.json"])
    # the local spool is empty once everything is uploaded; shards live only in S3
    assert not list((tmp_path / "cache").rglob("*.pt"))
    body = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket, Key="exp001/activations/manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert {e["file"] for e in manifest["shards"]} == set(expected)
    assert all(e["s3_uri"] == f"s3://{bucket}/exp001/activations/{e['file']}"
               for e in manifest["shards"])

    store = ShardStore(f"s3://{bucket}/exp001/activations", endpoint_url=endpoint,
                       cache_dir=str(tmp_path / "dl"))
    assert set(store.layers()) == {"mamba_backbone.blocks.1", "popt"}
    for entry, rows in store.iter_layer("mamba_backbone.blocks.1"):
        torch.testing.assert_close(rows, expected[entry["file"]])


def test_both_backend_keeps_local_copy_and_uploads(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    expected = _capture(tiny_net, tmp_path, endpoint, bucket, "both", storage_dtype="bfloat16")
    local = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    assert local == sorted(expected)
    assert _keys(endpoint, bucket) == sorted([f"exp001/activations/{n}" for n in expected] +
                                             ["exp001/activations/manifest.json"])
    from_local = ShardStore(tmp_path / "cache")
    from_s3 = ShardStore(f"s3://{bucket}/exp001/activations", endpoint_url=endpoint,
                         cache_dir=str(tmp_path / "dl"))
    assert from_local.manifest["shards"] == from_s3.manifest["shards"]
    for name in expected:
        a, b = from_local.load(name), from_s3.load(name)
        assert a["activations"]["popt"].dtype == torch.bfloat16
        assert torch.equal(a["activations"]["popt"], b["activations"]["popt"])


def test_multipart_upload_for_large_shards(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    lin = torch.nn.Linear(512, 1024)
    model = torch.nn.Sequential(lin)
    config = {"sample_layers": ["0"], "storage_backend": "s3", "storage_path": str(tmp_path),
              "s3_bucket": bucket, "s3_prefix": "big", "s3_endpoint_url": endpoint,
              "s3_multipart_threshold_mb": 5, "use_ray": False}
    with MechIntHooks(config).attach(model) as hooks:
        model(torch.randn(3000, 512))  # 3000 x 1024 float32 = 12 MB > 5 MB threshold
        name = hooks.sampler.save_activations(0)
    head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=f"big/{name}")
    assert "-" in head["ETag"]  # multipart ETags end in -<parts>
    store = ShardStore(f"s3://{bucket}/big", endpoint_url=endpoint, cache_dir=str(tmp_path / "dl"))
    assert store.read_layer("0").shape == (3000, 1024)


def test_cli_ls_reads_s3(tiny_net, tmp_path, s3_bucket, capsys, monkeypatch):
    endpoint, bucket = s3_bucket
    _capture(tiny_net, tmp_path, endpoint, bucket, "s3", steps=(0, 1))
    monkeypatch.setenv("MECHRAY_CACHE_DIR", str(tmp_path / "dl"))
    assert cli(["ls", f"s3://{bucket}/exp001/activations", "--endpoint-url", endpoint,
                "--shards"]) == 0
    out = capsys.readouterr().out
    assert "2 shard(s)" in out and "popt" in out and f"s3://{bucket}/exp001" in out


def test_a_missing_bucket_is_named_before_anything_is_written(tiny_net, tmp_path, s3_server):
    from mechray.errors import ConfigError

    config = {"sample_layers": ["popt"], "storage_backend": "s3", "storage_path": str(tmp_path),
              "s3_bucket": "no-such-bucket-here", "s3_endpoint_url": s3_server, "use_ray": False}
    hooks = MechIntHooks(config).register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    with pytest.raises(ConfigError, match="s3_bucket='no-such-bucket-here' does not exist"):
        hooks.sampler.save_activations(0)
    assert not list(tmp_path.rglob("*.pt"))
    hooks.close()


def test_upload_failure_keeps_the_shard_and_names_it(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    config = {"sample_layers": ["popt"], "storage_backend": "s3", "storage_path": str(tmp_path),
              "s3_bucket": bucket, "s3_endpoint_url": endpoint, "use_ray": False}
    hooks = MechIntHooks(config).register_hooks(tiny_net)
    tiny_net(torch.randn(2, 3, 6))
    hooks.sampler.save_activations(0)
    hooks.sampler.flush()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for key in _keys(endpoint, bucket, ""):   # the bucket goes away under the run
        s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)
    tiny_net(torch.randn(2, 3, 6))
    name = hooks.sampler.save_activations(1)
    with pytest.raises(Exception) as info:
        hooks.close()
    assert name in str(info.value) and "retry_failed" in str(info.value)
    assert (tmp_path / ".spool" / name).is_file()  # the spool keeps the bytes
    assert name in hooks.sampler.transport.failed      # and the writer keeps the shard
