"""Manifests at 10^4..10^6 shards: `mechray ls`, re-reads and paging, against a full parse.

Usage::

    .venv/bin/python benchmarks/manifest_scale.py                      # 1e4, 1e5, 1e6 entries
    .venv/bin/python benchmarks/manifest_scale.py --sizes 10000 100000 --baseline /work/main

For each size a store's ``manifest.json`` with that many entries (2 layers each, one step per
shard, as mechray's manifest owner writes it: head with the per-layer summary, one entry per
line) is written once.  Then, each in a fresh child process (so peak RSS is that operation's):

  baseline-ls   ``mechray ls`` of the mechray at ``--baseline`` (default: the commit this branch
                started from, checked out in a temporary worktree): parses every entry
  ls            ``mechray ls`` of this mechray: reads the manifest's head only
  open+refresh  ``ShardStore(path)`` then 10 ``refresh()`` calls with the manifest unchanged
  page          ``store.shards(offset=N//2, limit=100)`` twice: the first call parses the entries
                (once per manifest change), the second is a slice

Times are wall seconds inside the child (imports excluded); RSS is the child's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import machine, mechray_source, table, write_json  # noqa: E402

CHILD = r"""
import json, sys, time, io, contextlib
op, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from mechray.cli import main as cli
out = {}
if op.endswith("ls"):
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        rc = cli(["ls", path])
    out = {"seconds": time.perf_counter() - t0, "rc": rc, "first_line": buf.getvalue()[:120]}
else:
    from mechray import ShardStore
    t0 = time.perf_counter()
    store = ShardStore(path)
    layers = store.layers()
    out["open_s"] = time.perf_counter() - t0
    if op == "open+refresh":
        t0 = time.perf_counter()
        changed = [store.refresh() for _ in range(10)]
        out["refresh_s"] = (time.perf_counter() - t0) / 10
        out["changed"] = any(changed)
    else:
        t0 = time.perf_counter()
        page = store.shards(offset=n // 2, limit=100)
        out["first_page_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = store.shards(offset=n // 2, limit=100)
        out["next_page_s"] = time.perf_counter() - t0
        out["page_ok"] = [e["index"] for e in page] == list(range(n // 2, n // 2 + 100)) == \
            [e["index"] for e in again]
    out["layers"] = {k: v["shards"] for k, v in layers.items()}
import mechray
out["mechray"] = mechray.__file__
# VmHWM: this process's peak (ru_maxrss would carry the forking parent's peak across exec)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
out["max_rss_mb"] = int(hwm.split()[1]) / 1024
print("RESULT " + json.dumps(out))
"""


def build(path: Path, n: int) -> float:
    """Write a manifest of ``n`` entries the way the manifest owner does; returns its MB."""
    from mechray.storage.manifest import Manifest
    from mechray.storage.sink import StorageTarget

    target = StorageTarget(backend="local", local_dir=str(path))
    owner = Manifest(target, {"sample_layers": ["blocks.0", "blocks.1"]})
    digest = "sha256:" + "ab" * 32
    entries = [{"file": f"activations_shard_{i:06d}_step_{i * 10}.pt", "index": i, "rank": 0,
                "world_size": 1, "step": i * 10, "steps": [i * 10],
                "rows": {"blocks.0": 512, "blocks.1": 512},
                "layers": {"blocks.0": {"shape": [512, 384], "dtype": "float32"},
                           "blocks.1": {"shape": [512, 384], "dtype": "float32"}},
                "has_inputs": False, "run_id": "run-bench", "bytes": 1_573_000 + i % 7,
                "checksum": digest, "s3_uri": None, "written_at": "2026-11-30T00:00:00Z"}
               for i in range(n)]
    owner.add(*entries)
    return (path / "manifest.json").stat().st_size / 1e6


def child(op: str, path: Path, n: int, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    run = subprocess.run([sys.executable, "-c", CHILD, op, str(path), str(n)], env=env,
                         cwd=pythonpath, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{op} failed: {run.stderr[-2000:]}")
    return json.loads(line[7:])


def baseline_tree(ref: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="mechray-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "wt"), ref],
                   check=True, capture_output=True)
    return tmp / "wt"


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        t0 = time.perf_counter()
        mb = build(Path(sys.argv[2]), int(sys.argv[3]))
        print(mb, time.perf_counter() - t0)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--baseline", default=None,
                        help="a checkout of the mechray to compare with (default: merge-base "
                             "of HEAD and main, in a temporary worktree)")
    args = parser.parse_args()
    made = None
    if args.baseline is None:
        ref = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
                             capture_output=True, text=True, check=True).stdout.strip()
        made = baseline_tree(ref)
        base = str(made)
    else:
        base = args.baseline
    rows = []
    try:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(prefix="mechray-manifest-") as d:
                made_by = subprocess.run(  # in a child: the parent stays small
                    [sys.executable, str(Path(__file__)), "--build", d, str(n)], cwd=str(ROOT),
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                    check=True).stdout.split()
                mb, build_s = float(made_by[-2]), float(made_by[-1])
                old = child("baseline-ls", Path(d), n, base)
                new = child("ls", Path(d), n, str(ROOT))
                ref = child("open+refresh", Path(d), n, str(ROOT))
                page = child("page", Path(d), n, str(ROOT))
                assert page["page_ok"] and not ref["changed"] and new["rc"] == 0
                assert old["mechray"].startswith(base) and new["mechray"].startswith(str(ROOT))
                rows.append({"entries": n, "manifest_mb": round(mb, 1),
                             "write_s": round(build_s, 2),
                             "baseline_ls_s": round(old["seconds"], 3),
                             "baseline_ls_rss_mb": round(old["max_rss_mb"]),
                             "ls_s": round(new["seconds"], 3), "ls_rss_mb": round(new["max_rss_mb"]),
                             "ls_speedup": round(old["seconds"] / new["seconds"], 1),
                             "open_s": round(ref["open_s"], 3),
                             "refresh_unchanged_ms": round(ref["refresh_s"] * 1e3, 3),
                             "first_page_s": round(page["first_page_s"], 2),
                             "next_page_ms": round(page["next_page_s"] * 1e3, 3),
                             "page_rss_mb": round(page["max_rss_mb"])})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        if made is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(made)],
                           capture_output=True)
    print(table(rows, list(rows[0])))
    write_json("manifest_scale", {"rows": rows, "machine": machine(), "mechray": mechray_source(),
                                  "baseline": base})


if __name__ == "__main__":
    main()
