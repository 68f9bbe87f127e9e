"""API requests over a large manifest: the first and later ``/interpret/layers``, ``/interpret``
after a group commit, side by side with a baseline mechray.

Usage::

    .venv/bin/python benchmarks/api_manifest.py --quick                  # 10^4 and 10^5 entries
    .venv/bin/python benchmarks/api_manifest.py --sizes 1000000 --requests 3 --baseline /old

For each size and each side (``base``: the mechray at ``--baseline``, default none; ``new``:
this checkout), in a child process running that side's code, a store directory gets a
synthetic manifest of that many shard entries (two layers each; the shard files themselves are
not needed by these routes) written by that side's manifest owner, served by the FastAPI mixin
under uvicorn in a thread (``serve_in_thread``), queried over HTTP with httpx:

  first / second   ``GET /interpret/layers`` twice on a fresh server
  unchanged        ``GET /health``, ``/interpret/layers``, ``/interpret/shards?limit=100``
                   with the manifest untouched (median of ``--requests``)
  changed          the same with the manifest's mtime moved before each request
  commit           one group commit of one new entry by a manifest owner (a child process)
  interpret        then the first ``POST /interpret`` (neuron on ``blocks.0``): planning reads
                   the new manifest version (the layer's largest shard, for the cost check).
                   ``api_max_cost=1`` makes it answer 422 too_expensive once planned, so no analysis runs
                   (the synthetic store has no shard files): the time is the manifest's part
  peak_mb          the server process's peak RSS (VmHWM): before the commit, during the first
                   ``/interpret`` after it (the mark reset just before), and at the end

JSON: ``benchmarks/out/api_manifest-*.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_logging, table, write_json  # noqa: E402

log = logging.getLogger("bench.api_manifest")
ROUTES = ("/health", "/interpret/layers", "/interpret/shards?limit=100")


def write_manifest(root: Path, entries: int) -> None:
    """A manifest of ``entries`` shards written by the manifest owner of the mechray on the
    path, in a child process (so the server's peak memory is its own)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("manifest_scale.py")),
                    "--build", str(root), str(entries)], check=True, capture_output=True,
                   env=os.environ.copy())


def timed(client, path: str) -> float:
    t0 = time.perf_counter()
    r = client.get(path)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return elapsed * 1000


COMMIT = r"""
import sys
from mechray.storage.manifest import Manifest
from mechray.storage.sink import StorageTarget
i = int(sys.argv[2])
Manifest(StorageTarget(backend="local", local_dir=sys.argv[1])).add(
    {"file": f"activations_shard_{i:06d}_step_{i * 10}.pt", "index": i, "rank": 0,
     "world_size": 1, "step": i * 10, "steps": [i * 10], "rows": {"blocks.0": 700, "blocks.1": 700},
     "layers": {"blocks.0": {"shape": [700, 384], "dtype": "float32"},
                "blocks.1": {"shape": [700, 384], "dtype": "float32"}},
     "has_inputs": False, "run_id": "run-bench", "bytes": 1_573_000,
     "checksum": "sha256:" + "ab" * 32, "s3_uri": None})
"""


def peak_mb() -> float:
    hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def run(entries: int, requests: int) -> dict:
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin, MechIntConfig
    from mechray.testing import serve_in_thread

    with tempfile.TemporaryDirectory(prefix="mechray-bench-") as tmp:
        root = Path(tmp) / "store"
        write_manifest(root, entries)
        size_mb = (root / "manifest.json").stat().st_size / 2 ** 20
        config = MechIntConfig(sample_layers=["*"], storage_path=str(root), verbose=False,
                               api_max_cost=1)
        mixin = FastAPIIntegrationMixin(None, config)
        try:
            with serve_in_thread(mixin.add_routes(FastAPI())) as url, \
                    httpx.Client(base_url=url, timeout=600) as client:
                first = timed(client, "/interpret/layers")
                out = {"entries": entries, "manifest_mb": round(size_mb, 1),
                       "first_layers_ms": round(first, 1),
                       "second_layers_ms": round(timed(client, "/interpret/layers"), 1)}
                for case in ("unchanged", "changed"):
                    for path in ROUTES:
                        times = []
                        for _ in range(requests):
                            if case == "changed":
                                now = time.time_ns()
                                os.utime(root / "manifest.json", ns=(now, now))
                            times.append(timed(client, path))
                        out[f"{case} {path}"] = round(statistics.median(times), 2)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", COMMIT, str(root), str(entries + 1)],
                               check=True, env=os.environ.copy())
                out["commit_s"] = round(time.perf_counter() - t0, 2)
                out["peak_before_mb"] = round(peak_mb())
                with open("/proc/self/clear_refs", "w") as fh:   # VmHWM from here on
                    fh.write("5")
                body = {"analysis_type": "neuron", "layer_name": "blocks.0"}
                t0 = time.perf_counter()
                r = client.post("/interpret", json=body)
                out["interpret_after_commit_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                out["interpret_status"] = r.status_code
                out["interpret_peak_mb"] = round(peak_mb())
                assert r.status_code == 422 and b"too_expensive" in r.content, r.text[:300]
                t0 = time.perf_counter()
                layers = client.get("/interpret/layers").json()["layers"]
                out["layers_after_commit_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                assert layers["blocks.0"]["shards"] == entries + 1
                out["peak_mb"] = round(peak_mb())
        finally:
            mixin.close()
    return out


def side(n: int, requests: int, code: str) -> dict:
    """``run`` in a child process with the mechray at ``code``."""
    done = subprocess.run([sys.executable, str(Path(__file__)), "--one", str(n), str(requests)],
                          env={**os.environ, "PYTHONPATH": code}, cwd=code,
                          capture_output=True, text=True, timeout=7200)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{code}: {done.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        logging.basicConfig(level=logging.WARNING)
        print("RESULT " + json.dumps(run(int(sys.argv[2]), int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5, 3 requests")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a checkout of the mechray to compare "
                        "with (its own manifest format); default: this checkout only")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.requests = [10_000, 100_000], 3
    setup_logging()
    here = str(Path(__file__).resolve().parents[1])
    sides = ([("base", str(Path(args.baseline).resolve()))] if args.baseline else []) + \
        [("new", here)]
    rows = []
    for n in args.sizes:
        for name, code in sides:
            log.info("manifest of %d entries, %s (%s)", n, name, code)
            res = side(n, args.requests, code)
            row = {"entries": n, "side": name, "manifest_mb": res["manifest_mb"],
                   "first_layers_ms": res["first_layers_ms"],
                   "second_layers_ms": res["second_layers_ms"]}
            for path in ROUTES:
                row[f"changed {path} ms"] = res[f"changed {path}"]
            row.update({"commit_s": res["commit_s"],
                        "interpret_after_commit_ms": res["interpret_after_commit_ms"],
                        "layers_after_commit_ms": res["layers_after_commit_ms"],
                        "peak_before_mb": res["peak_before_mb"],
                        "interpret_peak_mb": res["interpret_peak_mb"],
                        "peak_mb": res["peak_mb"]})
            rows.append(row)
            print(table(rows[-1:], list(row)), flush=True)
    print(table(rows, list(rows[0])))
    write_json("api_manifest", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
