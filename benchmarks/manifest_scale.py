"""Manifests at 10^4..10^6 shards: a group commit's bytes, `mechray ls`, open and paging, side by side.

Usage::

    .venv/bin/python benchmarks/manifest_scale.py --quick                 # 1e4 and 1e5 entries
    .venv/bin/python benchmarks/manifest_scale.py                         # 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/manifest_scale.py --sizes 10000 --baseline /path/to/old/checkout

For each size and each side (``base``: the mechray at ``--baseline``, default the merge-base of
HEAD and main in a temporary worktree; ``new``: this checkout) a store's manifest with that many
entries (2 layers each, one step per shard) is written by that side's own manifest owner, in a
child process.  Then, each in a fresh child process running that side's code (so peak RSS is
that operation's alone):

  commit        ``Manifest(target)`` (the owner opening the store), then one group commit of
                one new entry: bytes written by that commit (``/proc/self/io`` wchar), its time
  ls            ``mechray ls``
  open          ``ShardStore(path).layers()`` then 10 ``refresh()`` with nothing changed
  page          ``store.shards(offset=N//2, limit=100)`` twice (first: builds the line index or
                parses the entries once per change; second: from that)

Times are wall seconds inside the child (imports of ``mechray.cli`` excluded) and, for ``ls``
and the commit, CPU seconds too (the figure to compare on a shared machine); RSS is the child's
peak (VmHWM).
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

from _common import machine, table, write_json  # noqa: E402

CHILD = r"""
import json, sys, time, io, contextlib, resource
op, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def wchar():
    return int(next(ln for ln in open("/proc/self/io") if ln.startswith("wchar:")).split()[1])
if op == "ls":
    from mechray.cli import main as cli
    t0, c0 = time.perf_counter(), cpu()
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        rc = cli(["ls", path])
    out = {"seconds": time.perf_counter() - t0, "cpu": cpu() - c0, "rc": rc}
elif op == "commit":
    from mechray.storage.manifest import Manifest
    from mechray.storage.sink import StorageTarget
    t0 = time.perf_counter()
    owner = Manifest(StorageTarget(backend="local", local_dir=path))
    out["owner_open_s"] = time.perf_counter() - t0
    i = n + 1
    entry = {"file": f"activations_shard_{i:06d}_step_{i * 10}.pt", "index": i, "rank": 0,
             "world_size": 1, "step": i * 10, "steps": [i * 10],
             "rows": {"blocks.0": 512, "blocks.1": 512},
             "layers": {"blocks.0": {"shape": [512, 384], "dtype": "float32"},
                        "blocks.1": {"shape": [512, 384], "dtype": "float32"}},
             "has_inputs": False, "run_id": "run-bench", "bytes": 1_573_000,
             "checksum": "sha256:" + "ab" * 32, "s3_uri": None,
             "written_at": "2026-11-30T00:00:00Z"}
    w0, t0, c0 = wchar(), time.perf_counter(), cpu()
    owner.add(entry)
    out["commit_s"] = time.perf_counter() - t0
    out["commit_cpu"] = cpu() - c0
    out["commit_bytes"] = wchar() - w0
else:
    from mechray import ShardStore
    t0 = time.perf_counter()
    store = ShardStore(path)
    layers = store.layers()
    out["open_s"] = time.perf_counter() - t0
    out["layers"] = {k: v["shards"] for k, v in layers.items()}
    if op == "open":
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
import mechray
out["mechray"] = mechray.__file__
# VmHWM: this process's peak (ru_maxrss would carry the forking parent's peak across exec)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
out["max_rss_mb"] = int(hwm.split()[1]) / 1024
print("RESULT " + json.dumps(out))
"""


def build(path: Path, n: int) -> float:
    """Write a manifest of ``n`` entries with the manifest owner of the mechray on the path
    (one group commit); returns its MB."""
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


def build_in_child(path: Path, n: int, code: str) -> tuple[float, float]:
    """``build`` with the mechray at ``code`` (its own manifest format); (MB, seconds)."""
    made = subprocess.run([sys.executable, str(Path(__file__)), "--build", str(path), str(n)],
                          cwd=code, env={**os.environ, "PYTHONPATH": code},
                          capture_output=True, text=True, check=True).stdout.split()
    return float(made[-2]), float(made[-1])


def child(op: str, path: Path, n: int, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    run = subprocess.run([sys.executable, "-c", CHILD, op, str(path), str(n)], env=env,
                         cwd=pythonpath, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{op} failed: {run.stderr[-2000:]}")
    out = json.loads(line[7:])
    assert out["mechray"].startswith(pythonpath), (out["mechray"], pythonpath)
    return out


def baseline_tree(ref: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="mechray-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "wt"), ref],
                   check=True, capture_output=True)
    return tmp / "wt"


def measure(n: int, side: str, code: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="mechray-manifest-") as d:
        mb, build_s = build_in_child(Path(d), n, code)
        ls = child("ls", Path(d), n, code)
        opened = child("open", Path(d), n, code)
        page = child("page", Path(d), n, code)
        commit = child("commit", Path(d), n, code)  # last: it changes the store
        assert page["page_ok"] and not opened["changed"] and ls["rc"] == 0
        return {"entries": n, "side": side, "manifest_mb": round(mb, 1),
                "build_s": round(build_s, 2),
                "commit_kb": round(commit["commit_bytes"] / 1e3, 1),
                "commit_s": round(commit["commit_s"], 3),
                "commit_cpu_s": round(commit["commit_cpu"], 3),
                "owner_open_s": round(commit["owner_open_s"], 2),
                "ls_s": round(ls["seconds"], 3), "ls_cpu_s": round(ls["cpu"], 3),
                "ls_rss_mb": round(ls["max_rss_mb"]),
                "open_s": round(opened["open_s"], 3), "open_rss_mb": round(opened["max_rss_mb"]),
                "refresh_ms": round(opened["refresh_s"] * 1e3, 3),
                "first_page_s": round(page["first_page_s"], 3),
                "next_page_ms": round(page["next_page_s"] * 1e3, 3),
                "page_rss_mb": round(page["max_rss_mb"])}


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        t0 = time.perf_counter()
        mb = build(Path(sys.argv[2]), int(sys.argv[3]))
        print(mb, time.perf_counter() - t0)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5 entries only")
    parser.add_argument("--new-only", action="store_true", help="measure this checkout only "
                        "(at 10^6 the baseline's figures are the issue's)")
    parser.add_argument("--baseline", default=None,
                        help="a checkout of the mechray to compare with (default: merge-base "
                             "of HEAD and main, in a temporary worktree)")
    args = parser.parse_args()
    sizes = [10_000, 100_000] if args.quick else args.sizes
    made = None
    if args.new_only:
        base = ""
    elif args.baseline is None:
        ref = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
                             capture_output=True, text=True, check=True).stdout.strip()
        made = baseline_tree(ref)
        base = str(made)
    else:
        base = str(Path(args.baseline).resolve())
    rows = []
    try:
        for n in sizes:
            for side, code in ((("base", base),) if base else ()) + (("new", str(ROOT)),):
                rows.append(measure(n, side, code))
                print(table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        if made is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(made)],
                           capture_output=True)
    print(table(rows, list(rows[0])))
    write_json("manifest_scale", {"rows": rows, "machine": machine(), "baseline": base})


if __name__ == "__main__":
    main()
