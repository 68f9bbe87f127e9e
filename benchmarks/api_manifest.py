"""API requests over a large manifest: parsed once per change, versus on every changed manifest.

Usage::

    .venv/bin/python benchmarks/api_manifest.py                    # 10^4 and 10^5 entries
    .venv/bin/python benchmarks/api_manifest.py --sizes 1000000 --requests 3

For each size a store directory gets a synthetic ``manifest.json`` of that many shard entries
(two layers each; the shard files themselves are not needed by these routes), served by the
FastAPI mixin under uvicorn in a thread (``serve_in_thread``), queried over HTTP with httpx:

  first       the first ``GET /interpret/layers``: opens the store (reads the manifest's head)
  unchanged   ``GET /health``, ``GET /interpret/layers``, ``GET /interpret/shards?limit=100``
              with the manifest untouched: the API parses nothing
  changed     the same requests with the manifest's mtime moved before each one: every request
              re-reads the head (layers) or the page's lines (shards), no entry is parsed; before,
              every change re-parsed the whole manifest (and the old 5 s timer made one request in
              every 5 s pay it, ``/health`` included)

Reported: median latency (ms) per route and case, and changed/unchanged ratios (the baseline,
run side by side in the same process).  JSON: ``benchmarks/out/api_manifest-*.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_logging, table, write_json  # noqa: E402

log = logging.getLogger("bench.api_manifest")
ROUTES = ("/health", "/interpret/layers", "/interpret/shards?limit=100")


def write_manifest(root: Path, entries: int) -> None:
    """A manifest of ``entries`` shards written the way mechray's manifest owner writes it (head
    with the per-layer summary, one entry per line): what a real store of that size holds."""
    from manifest_scale import build

    root.mkdir(parents=True, exist_ok=True)
    build(root, entries)


def timed(client, path: str) -> float:
    t0 = time.perf_counter()
    r = client.get(path)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return elapsed * 1000


def run(entries: int, requests: int) -> dict:
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin, MechIntConfig
    from mechray.testing import serve_in_thread

    with tempfile.TemporaryDirectory(prefix="mechray-bench-") as tmp:
        root = Path(tmp) / "store"
        write_manifest(root, entries)
        size_mb = (root / "manifest.json").stat().st_size / 2 ** 20
        config = MechIntConfig(sample_layers=["*"], storage_path=str(root), verbose=False)
        mixin = FastAPIIntegrationMixin(None, config)
        try:
            with serve_in_thread(mixin.add_routes(FastAPI())) as url, \
                    httpx.Client(base_url=url, timeout=600) as client:
                first = timed(client, "/interpret/layers")
                out = {"entries": entries, "manifest_mb": round(size_mb, 1),
                       "first_ms": round(first, 1)}
                for case in ("unchanged", "changed"):
                    for path in ROUTES:
                        times = []
                        for _ in range(requests):
                            if case == "changed":
                                now = time.time_ns()
                                os.utime(root / "manifest.json", ns=(now, now))
                            times.append(timed(client, path))
                        out[f"{case} {path}"] = round(statistics.median(times), 2)
        finally:
            mixin.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rows = []
    for n in args.sizes:
        log.info("manifest of %d entries", n)
        res = run(n, args.requests)
        for path in ROUTES:
            same, changed = res[f"unchanged {path}"], res[f"changed {path}"]
            rows.append({"entries": n, "manifest_mb": res["manifest_mb"],
                         "first_ms": res["first_ms"], "route": path, "unchanged_ms": same,
                         "changed_ms": changed, "ratio": round(changed / max(same, 1e-9), 1)})
    print(table(rows, ["entries", "manifest_mb", "first_ms", "route", "unchanged_ms",
                       "changed_ms", "ratio"]))
    write_json("api_manifest", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
