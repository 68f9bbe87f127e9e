"""Shard write throughput: mechray's writers (threads, Ray pool) against raw writes of the bytes.

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/write_throughput.py
    .venv/bin/python benchmarks/write_throughput.py --rows 10000 --dim 512 --layers 2 --shards 6
    .venv/bin/python benchmarks/write_throughput.py --sweep 1,4,16,64,256   # MB per shard

Modes (each round runs every mode once, in a rotating order; every mode writes ``--shards``
shards of ``rows x dim x layers`` float32 into a fresh store):

  raw-local     open / write / fsync / close of the exact bytes of a mechray shard file
  thread-local  mechray's in-process writer threads (``use_ray=False``), local backend
  ray-local     mechray's Ray writer pool (local ``ray.init``), local backend
  raw-s3        boto3 ``upload_file`` (default client and TransferConfig) of the same bytes
  thread-s3     mechray writer threads, ``storage_backend='s3'`` (spool + fsync + upload)
  ray-s3        mechray Ray writer pool, ``storage_backend='s3'``
  thread-local-sha256, ray-local-sha256
                as thread-local / ray-local with ``checksum='sha256'``: the write path before
                issue 11 (``torch.save`` with its zip CRC-32 records plus a sha256 of every byte),
                measured side by side with the CRC32C default

``--sweep 1,4,16,...`` repeats the local modes for shards of those sizes in MB (rows adjusted,
``--dim`` and ``--layers`` kept; enough shards per size for ``--sweep-mb`` MB per mode) and prints
one table plus a PNG (``benchmarks/plots/write_throughput_sweep.png``) of MB/s against shard size.

The S3 server is moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port) in this process, with
fake credentials.  For mechray the clock runs from the first ``submit`` of an in-memory shard
(tensors as the hooks leave them) to the end of ``flush()`` (every shard durable and in the
manifest): serialising, hashing, the manifest and (Ray) the object store are all inside it.
Writer pools are created and warmed with one tiny shard before the clock starts.
MB/s counts the shard files' bytes (1 MB = 1e6 bytes).  Aim: mechray >= 0.8 x raw.

Also printed: CPU milliseconds per shard by thread/process (Linux ``/proc``), to tell a
CPU-bound mode (serialise + hash + copies) from a disk- or server-bound one.  The moto server
runs in this process, so its CPU shows under "driver threads" in the S3 modes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT,
    CpuAccount,
    log2_axes,
    machine,
    pyplot,
    save_figure,
    setup_env,
    setup_logging,
    start_ray,
    table,
    write_json,
)

setup_env()
# moto accepts any credentials; set them before Ray starts so the writer actors inherit them
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
    os.environ.pop(var, None)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("bench.write_throughput")
MODES = ("raw-local", "thread-local", "ray-local", "raw-s3", "thread-s3", "ray-s3",
         "thread-local-sha256", "ray-local-sha256")
SWEEP_MODES = ("raw-local", "thread-local", "ray-local", "thread-local-sha256", "ray-local-sha256")
PAIRS = {"thread-local": "raw-local", "ray-local": "raw-local",
         "thread-s3": "raw-s3", "ray-s3": "raw-s3",
         "thread-local-sha256": "raw-local", "ray-local-sha256": "raw-local"}
FIGURES = Path(__file__).resolve().parent / "plots"


def pending(index: int, step: int, acts: dict[str, torch.Tensor]):
    """An in-memory shard as ``ActivationSampler.save_activations`` hands it to the writer."""
    from mechray.storage.shard import Chunk, PendingShard, shard_name

    rows = max(len(t) for t in acts.values())
    return PendingShard(name=shard_name(index, step), index=index, step=step, rank=0,
                        world_size=1, max_rows=rows,
                        chunks={k: [Chunk(rows=t, step=step, positions=None)]
                                for k, t in acts.items()},
                        layer_info={k: {"source_shape": list(t.shape), "dropped_rows": 0}
                                    for k, t in acts.items()})


class Bench:
    def __init__(self, args):
        self.args = args
        self.cpu = CpuAccount()
        self.last_cpu: dict = {}
        self.scratch = Path(tempfile.mkdtemp(prefix="write_throughput-", dir=args.scratch))
        g = torch.Generator().manual_seed(0)
        self.acts = {f"mamba_backbone.blocks.{i}": torch.randn(args.rows, args.dim, generator=g)
                     for i in range(args.layers)}
        from mechray.storage.shard import encode

        self.shard_bytes, _ = encode(pending(0, 0, self.acts).materialize())
        self.endpoint = self.bucket = self.server = None

    # --- S3 server ------------------------------------------------------------------------------
    def start_s3(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint)   # the raw baseline's client
        self.bucket = "mechray-bench"
        self.s3.create_bucket(Bucket=self.bucket)
        log.info("moto S3 server at %s", self.endpoint)

    def empty_prefix(self, prefix: str) -> None:
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    # --- modes ---------------------------------------------------------------------------------
    def raw_local(self, tag: str) -> tuple[float, int]:
        d = self.scratch / tag
        d.mkdir()
        data, n = self.shard_bytes, self.args.shards
        c0, t0 = self.cpu.snapshot(), time.perf_counter()
        for i in range(n):
            with open(d / f"raw_{i:06d}.pt", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        dt = time.perf_counter() - t0
        self.last_cpu = CpuAccount.delta(self.cpu.snapshot(), c0)
        shutil.rmtree(d, ignore_errors=True)
        return dt, n * len(data)

    def raw_s3(self, tag: str) -> tuple[float, int]:
        src = self.scratch / f"{tag}.src.pt"
        src.write_bytes(self.shard_bytes)
        n = self.args.shards
        c0, t0 = self.cpu.snapshot(), time.perf_counter()
        for i in range(n):
            self.s3.upload_file(str(src), self.bucket, f"{tag}/raw_{i:06d}.pt")
        dt = time.perf_counter() - t0
        self.last_cpu = CpuAccount.delta(self.cpu.snapshot(), c0)
        src.unlink()
        self.empty_prefix(tag)
        return dt, n * len(self.shard_bytes)

    def mechray(self, tag: str, use_ray: bool, backend: str, checksum: str = "crc32c"
                ) -> tuple[float, int]:
        from mechray import MechIntConfig
        from mechray.storage.transport import make_transport

        extra = dict(s3_bucket=self.bucket, s3_prefix=tag, s3_endpoint_url=self.endpoint) \
            if backend == "s3" else {}
        config = MechIntConfig(sample_layers=list(self.acts), storage_backend=backend,
                               storage_path=str(self.scratch / tag), verbose=False,
                               use_ray=use_ray, max_activations_per_shard=self.args.rows,
                               num_writers=self.args.writers,
                               max_shards_in_flight=self.args.in_flight, checksum=checksum,
                               **extra)
        transport = make_transport(config)
        first = transport.start()
        tiny = {k: t[:1].clone() for k, t in self.acts.items()}
        warm = self.args.writers                           # one tiny shard per writer (not timed)
        for i in range(warm):
            transport.submit(pending(first + i, 0, tiny))
        transport.flush()
        warm_bytes = transport.stats.bytes_written
        shards = [pending(first + warm + i, i + 1, self.acts) for i in range(self.args.shards)]
        c0, t0 = self.cpu.snapshot(), time.perf_counter()
        for p in shards:
            transport.submit(p)
        transport.flush()
        dt = time.perf_counter() - t0
        self.last_cpu = CpuAccount.delta(self.cpu.snapshot(), c0)
        nbytes = transport.stats.bytes_written - warm_bytes
        transport.close()
        if use_ray:
            import ray

            for actor in transport.pool.writers + [transport.pool.manifest]:
                ray.kill(actor, no_restart=True)
        shutil.rmtree(self.scratch / tag, ignore_errors=True)
        if backend == "s3":
            self.empty_prefix(tag)
        return dt, nbytes

    def run_mode(self, mode: str, tag: str) -> tuple[float, int]:
        if mode == "raw-local":
            return self.raw_local(tag)
        if mode == "raw-s3":
            return self.raw_s3(tag)
        kind, backend, *algo = mode.split("-")
        return self.mechray(tag, use_ray=kind == "ray", backend="local" if backend == "local"
                            else "s3", checksum=algo[0] if algo else "crc32c")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def run(args) -> dict[str, Any]:
    load_before = list(os.getloadavg())
    bench = Bench(args)
    log.info("shard: %d rows x %d floats x %d layers = %.1f MB on disk; %d shards per mode, "
             "%d rounds", args.rows, args.dim, args.layers, len(bench.shard_bytes) / 1e6,
             args.shards, args.rounds)
    speeds: dict[str, list[float]] = {m: [] for m in args.modes}
    seconds: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu_ms: dict[str, dict[str, float]] = {m: {} for m in args.modes}   # summed over rounds
    try:
        if any(m.startswith("ray") for m in args.modes):
            start_ray(args.ray_cpus)
        if any(m.endswith("s3") for m in args.modes):
            bench.start_s3()
        jobs = [(r, m) for r in range(args.rounds)
                for m in args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]]
        for r, mode in tqdm(jobs, desc="modes", unit="mode", file=sys.stderr):
            dt, nbytes = bench.run_mode(mode, f"{mode}-r{r}")
            speeds[mode].append(nbytes / 1e6 / dt)
            seconds[mode].append(dt)
            c = bench.last_cpu
            groups = {"driver main": c.get("main_run", 0.0),
                      "driver threads": c.get("threads", 0.0),
                      **bench.cpu.by_label(c.get("pids", {}))}
            for k, x in groups.items():
                cpu_ms[mode][k] = cpu_ms[mode].get(k, 0.0) + x
            log.info("round %d %-12s %7.1f MB/s (%.1f MB in %.2fs)", r, mode, nbytes / 1e6 / dt,
                     nbytes / 1e6, dt)
    finally:
        bench.close()
    results, rows = {}, []
    for mode in args.modes:
        med = statistics.median(speeds[mode])
        shards_total = args.shards * len(speeds[mode])
        per_shard = {k: x * 1e3 / shards_total for k, x in
                     sorted(cpu_ms[mode].items(), key=lambda kv: -kv[1]) if x > 0}
        res = {"mb_per_s": speeds[mode], "median_mb_per_s": med, "seconds": seconds[mode],
               "cpu_ms_per_shard": per_shard,
               "cpu_ms_per_shard_total": sum(per_shard.values()),
               "wall_ms_per_shard": sum(seconds[mode]) * 1e3 / shards_total}
        base = PAIRS.get(mode)
        if base in speeds:
            res["vs"] = base
            res["ratio"] = med / statistics.median(speeds[base])
            res["ratio_per_round"] = [a / b for a, b in zip(speeds[mode], speeds[base])]
        results[mode] = res
        rows.append({"mode": mode, "MB/s (median)": med,
                     "MB/s per round": " ".join(f"{s:.0f}" for s in speeds[mode]),
                     "vs": base or "", "ratio": res.get("ratio")})
    aims = {f"{m}/{results[m]['vs']}>=0.8": results[m]["ratio"] >= 0.8
            for m in args.modes if "ratio" in results[m]}
    out = {"benchmark": "write_throughput", "args": vars(args), "machine": machine(),
           "shard_bytes": len(bench.shard_bytes), "loadavg_before": load_before,
           "loadavg_after": list(os.getloadavg()), "results": results, "aims_met": aims}
    print()
    print(f"write throughput: shards of {args.rows} x {args.dim} float32 x {args.layers} layers "
          f"= {len(bench.shard_bytes) / 1e6:.1f} MB, {args.shards} per mode, {args.rounds} rounds; "
          f"mechray num_writers={args.writers}, max_shards_in_flight={args.in_flight}")
    print(table(rows, ["mode", "MB/s (median)", "MB/s per round", "vs", "ratio"]))
    print()
    print("CPU per shard (ms, all processes of this run; wall ms per shard for comparison):")
    for mode in args.modes:
        r = results[mode]
        parts = ", ".join(f"{k} {x:.1f}" for k, x in r["cpu_ms_per_shard"].items() if x >= 0.5)
        print(f"  {mode:12s} wall {r['wall_ms_per_shard']:7.1f}  "
              f"cpu {r['cpu_ms_per_shard_total']:7.1f}: {parts}")
    print("aims:", ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in aims.items()) or "n/a")
    print(f"load average before {load_before}, after {out['loadavg_after']} "
          f"on {out['machine']['host_cpus']} CPUs")
    return out


def sweep(args) -> dict[str, Any]:
    """The local modes for each shard size in ``args.sweep`` (MB): a table and a PNG."""
    import copy

    per_row = args.dim * args.layers * 4
    points, rows = [], []
    for size in args.sweep:
        a = copy.copy(args)
        a.rows = max(1, int(size * 1e6 / per_row))
        a.shards = max(2, int(args.sweep_mb // size))
        a.modes = [m for m in SWEEP_MODES if m in args.modes or args.modes == list(MODES)]
        log.info("sweep: %s MB shards (%d rows), %d per mode", size, a.rows, a.shards)
        out = run(a)
        res = out["results"]
        point = {"shard_mb": out["shard_bytes"] / 1e6, "shards_per_mode": a.shards,
                 "loadavg_after": out["loadavg_after"],
                 **{m: res[m]["median_mb_per_s"] for m in a.modes},
                 # CPU of every thread and process of the run per MB landed: what a write costs
                 # the machine, much less sensitive to other users' load than MB/s
                 **{f"{m} cpu_ms_per_mb": res[m]["cpu_ms_per_shard_total"] / (out["shard_bytes"] / 1e6)
                    for m in a.modes},
                 **{f"{m}/raw": res[m]["ratio"] for m in a.modes if "ratio" in res[m]}}
        points.append(point)
        rows.append({"shard MB": point["shard_mb"], "shards": a.shards,
                     **{m: point[m] for m in a.modes},
                     **{f"{m} / raw": point.get(f"{m}/raw") for m in a.modes if m != "raw-local"},
                     **{f"{m} cpu ms/MB": point[f"{m} cpu_ms_per_mb"] for m in a.modes},
                     "load": f"{point['loadavg_after'][0]:.1f}"})
    print()
    print(f"write throughput sweep (MB/s, median of {args.rounds} rounds; ratio to raw "
          f"write+fsync of the same bytes):")
    print(table(rows, list(rows[0])))
    plot = _plot_sweep(points, [m for m in SWEEP_MODES if m in points[0]])
    print(f"plot: {plot}")
    return {"benchmark": "write_throughput_sweep", "args": vars(args), "machine": machine(),
            "points": points, "plot": str(plot), "loadavg_after": list(os.getloadavg())}


def _plot_sweep(points: list[dict[str, Any]], modes: list[str]) -> Path:
    fig, (ax, rx, cx) = pyplot().subplots(1, 3, figsize=(15, 4))
    sizes = [p["shard_mb"] for p in points]
    colors = {"raw-local": "black", "thread-local": "tab:blue", "ray-local": "tab:orange",
              "thread-local-sha256": "tab:blue", "ray-local-sha256": "tab:orange"}
    for m in modes:
        style = "--" if m.endswith("sha256") else "-"
        ax.plot(sizes, [p[m] for p in points], style, color=colors.get(m), marker="o", label=m)
        if m != "raw-local":
            rx.plot(sizes, [p[f"{m}/raw"] for p in points], style, color=colors.get(m),
                    marker="o", label=m)
        if f"{m} cpu_ms_per_mb" in points[0]:
            cx.plot(sizes, [p[f"{m} cpu_ms_per_mb"] for p in points], style, color=colors.get(m),
                    marker="o", label=m)
    log2_axes(((ax, "MB/s landed (durable, listed)"), (rx, "÷ raw write+fsync"),
               (cx, "CPU ms per MB, all processes")), "shard size (MB)")
    rx.axhline(0.8, color="grey", lw=0.8)
    ax.legend(fontsize=8)
    return save_figure(fig, FIGURES / "write_throughput_sweep.png",
                       "mechray local shard writes vs shard size (2 vCPU)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES), help="comma list from " + ",".join(MODES))
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--shards", type=int, default=5, help="shards per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writers", type=int, default=2, help="mechray num_writers")
    p.add_argument("--in-flight", type=int, default=4, help="mechray max_shards_in_flight")
    p.add_argument("--ray-cpus", type=int, default=3)
    p.add_argument("--scratch", default=None, help="where files go (a temp dir inside it)")
    p.add_argument("--sweep", default=None,
                   help="comma list of shard sizes in MB (e.g. 1,4,16,64,256): the local modes "
                        "at each size, a table and a PNG")
    p.add_argument("--sweep-mb", type=float, default=128.0,
                   help="--sweep: MB written per mode per round at each size (at least 2 shards)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.sweep = [float(x) for x in args.sweep.split(",")] if args.sweep else None
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {','.join(MODES)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.scratch is None:
        args.scratch = str(OUT)
    t0 = time.perf_counter()
    result = sweep(args) if args.sweep else run(args)
    result["wall_seconds"] = time.perf_counter() - t0
    print(f"total wall {result['wall_seconds']:.0f}s")
    if not args.no_json:
        write_json("write_throughput_sweep" if args.sweep else "write_throughput", result)


if __name__ == "__main__":
    main()
