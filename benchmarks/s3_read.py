"""Reading from S3: neuron stats with 2 Ray workers on a store in S3 ÷ a plain boto3 download of
the same objects, side by side (issue 11, item 6).

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/s3_read.py
    .venv/bin/python benchmarks/s3_read.py --rounds 3 --workers 2

The store is ``analysis_scaling.py``'s (50 shards x 10 000 rows x d=512 float32, 1.03 GB of
files in ``benchmarks/out/analysis_scaling_cache``; written first if missing), uploaded once per
run to a moto S3 server (``ThreadedMotoServer`` on 127.0.0.1, port 0) that runs in a child
process of its own, so its Python threads do not share this process' GIL.  Variants, interleaved
over ``--rounds`` rounds (order rotated), seconds per run:

``boto3_get``       ``get_object(...)["Body"].read()`` of every shard object, one after another,
                    into memory (what a plain script would do)
``boto3_download``  ``download_file`` of every shard object to a temp directory (boto3's managed
                    transfer: ranged GETs in threads for objects over 8 MB)
``mechray``         ``Engine("s3://...", use_ray=True).run(["neuron"])`` with ``--workers`` Ray
                    CPUs on this machine, a fresh cache directory each run (every shard is read
                    from S3 and its checksum verified)
``mechray_local``   the same analysis on the local copy of the store (checksums verified
                    again): what the analysis costs without S3, so ``mechray - mechray_local``
                    is what reading from S3 adds

Ratio: the faster boto3 variant's median ÷ mechray's median (aim >= 0.8).  The JSON
(``benchmarks/out/s3_read-<time>.json``) has every sample, the load average before and after
each, and which ``mechray`` was measured (run it with ``PYTHONPATH`` pointing at another tree,
from that tree's directory, to measure that tree the same way).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine, mechray_source, setup_env, setup_logging, start_ray, table, write_json  # noqa: E402

setup_env()
for _k, _v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
               ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)        # moto's test server accepts any key; Ray workers inherit
log = logging.getLogger("bench.s3_read")


def _serve(conn) -> None:
    """Child process: a moto S3 server on 127.0.0.1:0; sends its URL, serves until told."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send(f"http://{host}:{port}")
    conn.recv()
    server.stop()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def upload(endpoint: str, root: Path, bucket: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    keys = []
    for p in sorted(root.glob("*.pt")):
        s3.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        keys.append(f"{prefix}/{p.name}")
    for p in sorted(root.glob("manifest*.json")):
        s3.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return keys


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=str(OUT / "analysis_scaling_cache"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs (workers) for mechray")
    p.add_argument("--variants", default="boto3_get,boto3_download,mechray,mechray_local")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    root = Path(args.cache)
    if not (root / "manifest.json").is_file():
        import analysis_scaling as a

        a.ensure_store(root, 50, 10000, 512, 0)
    nbytes = sum(f.stat().st_size for f in root.glob("*.pt"))
    here, there = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(there,), daemon=True)
    server.start()
    endpoint = here.recv()
    out: dict[str, Any] = {"benchmark": "s3_read", "load_start": load(), "endpoint": endpoint,
                           "bytes": nbytes, "mechray": mechray_source()}
    try:
        import boto3

        t0 = time.perf_counter()
        keys = upload(endpoint, root, "bench", "store")
        log.info("uploaded %d objects, %.2f GB, in %.1fs", len(keys), nbytes / 1e9,
                 time.perf_counter() - t0)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        ray = start_ray(num_cpus=args.workers)
        from mechray.analysis.engine import Engine

        tmp = Path(tempfile.mkdtemp(prefix="s3_read-"))
        counter = [0]

        def boto3_get() -> None:
            for k in keys:
                s3.get_object(Bucket="bench", Key=k)["Body"].read()

        def boto3_download() -> None:
            d = tmp / "dl"
            d.mkdir(exist_ok=True)
            for k in keys:
                s3.download_file("bench", k, str(d / k.rsplit("/", 1)[-1]))
            shutil.rmtree(d)

        def mechray() -> None:
            counter[0] += 1
            cache = tmp / f"cache{counter[0]}"
            from mechray import ShardStore

            store = ShardStore("s3://bench/store", endpoint_url=endpoint, cache_dir=str(cache))
            Engine(store, use_ray=True, progress=False).run(["neuron"])
            shutil.rmtree(cache, ignore_errors=True)

        def mechray_local() -> None:
            counter[0] += 1          # a new spelling of the path: every checksum verified again
            Engine(str(root) + "/" * counter[0], use_ray=True, progress=False).run(["neuron"])

        fns: dict[str, Callable[[], None]] = {"boto3_get": boto3_get,
                                              "boto3_download": boto3_download,
                                              "mechray": mechray, "mechray_local": mechray_local}
        # warm-up (worker start, imports): not timed
        ray.get([ray.remote(lambda: __import__("mechray.analysis.engine")).remote()
                 for _ in range(args.workers)])
        import psutil
        from analysis_scaling import busy_seconds, tree_usage

        moto = psutil.Process(server.pid)

        def server_cpu() -> float:
            t = moto.cpu_times()
            return t.user + t.system

        samples: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                l0 = load()
                u0, b0, m0 = tree_usage(), busy_seconds(), server_cpu()
                t0 = time.perf_counter()
                fns[v]()
                dt = time.perf_counter() - t0
                u1 = tree_usage()
                samples[v].append({
                    "seconds": dt, "load_before": l0, "load_after": load(),
                    # CPU seconds of this process tree (boto3 or the engine, Ray's workers, the
                    # moto server), of the moto server alone, and cores busy machine-wide
                    "tree_cpu_s": u1["user_s"] + u1["sys_s"] - u0["user_s"] - u0["sys_s"],
                    "server_cpu_s": server_cpu() - m0,
                    "busy_cores": (busy_seconds() - b0) / dt})
                log.info("round %d %s: %.2f s (%.0f MB/s), load %s", r, v, dt, nbytes / dt / 1e6,
                         l0)
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    finally:
        here.send("stop")
        server.join(timeout=30)
    med = {v: statistics.median(s["seconds"] for s in ss) for v, ss in samples.items()}
    rows = [{"variant": v, "median_s": med[v], "MB/s": nbytes / med[v] / 1e6,
             "runs_s": ", ".join(f"{s['seconds']:.2f}" for s in samples[v]),
             "load1": statistics.median(s["load_before"][0] for s in samples[v]),
             **{k: statistics.median(s[k] for s in samples[v])
                for k in ("tree_cpu_s", "server_cpu_s", "busy_cores")}}
            for v in variants]
    print(f"\nS3 read: {len(keys)} objects, {nbytes / 1e9:.2f} GB on moto at {endpoint}; "
          f"mechray = neuron stats with {args.workers} Ray workers; {args.rounds} rounds")
    print(table(rows, ["variant", "median_s", "MB/s", "runs_s", "tree_cpu_s", "server_cpu_s",
                       "busy_cores", "load1"]))
    print("   tree_cpu_s: CPU seconds of this process, the moto server and Ray's workers; "
          "server_cpu_s: the moto server alone; busy_cores: machine-wide CPU use / wall")
    boto = [v for v in ("boto3_get", "boto3_download") if v in med]
    if boto and "mechray" in med:
        best = min(boto, key=lambda v: med[v])
        ratio = med[best] / med["mechray"]
        out["ratio"] = {"baseline": best, "boto3_over_mechray": ratio}
        print(f"   {best} / mechray = {ratio:.2f}  (aim >= 0.8: "
              f"{'met' if ratio >= 0.8 else 'MISSED'})")
        if "mechray_local" in med:
            added = med["mechray"] - med["mechray_local"]
            out["ratio"].update(local_over_s3=med["mechray_local"] / med["mechray"],
                                s3_added_seconds=added)
            print(f"   mechray_local / mechray = {med['mechray_local'] / med['mechray']:.2f}; "
                  f"reading from S3 adds {added:.2f} s to the analysis ({best} alone takes "
                  f"{med[best]:.2f} s)")
    out.update(samples=samples, median_seconds=med, load_end=load(), machine=machine(),
               args=vars(args))
    print(f"load average: start {out['load_start']}, end {out['load_end']}")
    write_json("s3_read", out)
    return out


if __name__ == "__main__":
    main()
