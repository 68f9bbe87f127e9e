"""The commands that only read manifests start without torch or Ray (issue 11, item 8).

Each command runs in a fresh interpreter, as the ``mechray`` console script runs it, and reports
which of torch and Ray ended up in ``sys.modules``; the output is checked too, so a command that
skipped its work cannot pass.  Also: every public name of ``mechray`` still imports (lazily).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from conftest import capture_tiny
from torch import nn

from mechray.testing import free_port

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["mamba_backbone.blocks.1", "popt"]
CHILD = """
import json, sys
from mechray.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
sys.stdout.flush()
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'transformers'})
print('\\n@@' + json.dumps({'rc': rc, 'heavy': heavy}))
"""


def run_cli(*argv: str, env: dict | None = None) -> tuple[int, list[str], str]:
    """``mechray <argv>`` in a fresh interpreter: (exit code, heavy modules imported, stdout)."""
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, **(env or {}),
                                                     "PYTHONPATH": str(REPO)})
    text, _, tail = out.stdout.rpartition("\n@@")
    assert tail, f"the child died before reporting: {out.stderr[-3000:]}"
    report = json.loads(tail)
    return report["rc"], report["heavy"], text + out.stderr


def test_ls_lists_a_store_without_torch_or_ray(tmp_path):
    capture_tiny(tmp_path / "store", LAYERS, steps=(0, 1, 2))
    rc, heavy, out = run_cli("ls", str(tmp_path / "store"), "--shards")
    assert rc == 0, out
    assert heavy == []
    assert "3 shard(s)" in out and "steps 0..2" in out
    for layer in LAYERS:
        assert layer in out
    assert out.count("activations_shard_") == 3          # --shards lists every entry


def test_ls_of_an_s3_store_without_torch_or_ray(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    capture_tiny(tmp_path / "local", LAYERS, steps=(0, 1), storage_backend="both",
                 s3_bucket=bucket, s3_prefix="exp", s3_endpoint_url=endpoint)
    rc, heavy, out = run_cli("ls", f"s3://{bucket}/exp", "--endpoint-url", endpoint,
                             env={"MECHRAY_CACHE_DIR": str(tmp_path / "cache")})
    assert rc == 0, out
    assert heavy == []
    assert f"s3://{bucket}/exp: 2 shard(s)" in out and "popt" in out


def test_help_and_version_without_torch_or_ray():
    rc, heavy, out = run_cli("--help")
    assert rc == 0 and heavy == [] and "serve" in out and "analyze" in out
    rc, heavy, out = run_cli("--version")
    from mechray.version import __version__

    assert rc == 0 and heavy == [] and f"mechray {__version__}" in out
    rc, heavy, out = run_cli("ls", "--help")
    assert rc == 0 and heavy == [] and "--shards" in out


def test_analyze_help_still_lists_the_analyses():
    rc, _, out = run_cli("analyze", "--help")
    assert rc == 0
    assert "neuron (" in out and "sae (" in out                 # from the registry


def test_a_bad_store_is_a_clear_error_without_torch(tmp_path):
    rc, heavy, out = run_cli("ls", str(tmp_path / "nothing-here"))
    assert rc == 2 and heavy == []
    assert "holds no manifest.json" in out


def test_sync_uploads_spooled_shards_without_torch_or_ray(tmp_path, s3_server):
    """Shards captured while S3 is unreachable wait in the spool; `mechray sync` uploads them."""
    bucket = "mechray-sync-startup"
    dead = f"http://127.0.0.1:{free_port()}"              # nothing listens there
    from mechray import ActivationSampler

    model = nn.Sequential(nn.Linear(8, 16))
    sampler = ActivationSampler(layers=["0"], save_dir=str(tmp_path / "run"),
                                storage_backend="s3", s3_bucket=bucket, s3_prefix="run",
                                s3_endpoint_url=dead, s3_retry_seconds=0.2, use_ray=False,
                                verbose=False)
    sampler.register_hooks(model)
    names = []
    for step in range(2):
        with torch.no_grad():
            model(torch.randn(4, 8))
        names.append(sampler.save_activations(step))
    sampler.close()
    assert sorted(p.name for p in (tmp_path / "run" / ".spool").glob("*.pt")) == sorted(names)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)

    rc, heavy, out = run_cli("sync", str(tmp_path / "run"), "--endpoint-url", s3_server)
    assert rc == 0, out
    assert heavy == []
    assert "2 shard(s) uploaded, 0 still pending" in out
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket,
                                                                        Prefix="run/")
    keys = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    assert set(names) | {"manifest.json"} <= keys


def test_import_mechray_is_light_and_every_public_name_still_imports():
    code = ("import sys, mechray\n"
            "light = not ({'torch', 'ray'} & set(sys.modules))\n"
            "names = {n: type(getattr(mechray, n)).__name__ for n in mechray.__all__}\n"
            "from mechray import MechIntHooks, ShardStore, FastAPIIntegrationMixin\n"
            "assert set(mechray.__all__) <= set(dir(mechray))\n"
            "print(light, sorted(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    light, _, names = out.stdout.strip().partition(" ")
    assert light == "True"
    import mechray

    assert names == str(sorted(mechray.__all__))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        mechray.NoSuchName  # noqa: B018
