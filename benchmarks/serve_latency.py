"""Serve latency: the interpretation API through Ray Serve and through the plain mixin (uvicorn).

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --clients 32 --seconds 10 --features 256

Cases, each at ``--clients`` concurrent keep-alive clients for ``--seconds`` (after 1 s warm-up):

  GET  /interpret/layers                       the store's layers (cached per manifest version)
  POST /interpret {"analysis_type": "neuron"}  a cached analysis result (primed before the clock)

Servers, one after the other on 127.0.0.1 (free ports):

  fastapi   ``FastAPIIntegrationMixin(model, config).add_routes(FastAPI())`` under uvicorn, one
            worker process
  serve     ``mechray.serve:build_app`` on a local Ray (num_cpus=3): Serve's HTTP proxy ->
            FastAPI ingress replica (answers layers and cached results itself) -> analysis
            replica, one replica each; access logs off
  serve+x   with ``--serve-env RAY_SERVE_X``: the same with Ray's switch ``RAY_SERVE_X=1``
            (e.g. ``THROUGHPUT_OPTIMIZED``: gRPC between proxy and replicas, user code and router
            on the replica's main loop; ``ENABLE_HA_PROXY``: HAProxy instead of Serve's proxy)

Each server runs in its own spawned process (stopped, Ray shut down, before the next starts).

The client is a minimal asyncio HTTP/1.1 client in this process (pre-built requests, status line
and Content-Length parsing; every body's length checked, the first body of a case parsed), so
little of the CPU goes to load generation.  Reported per case: p50/p90/p99/max latency (ms),
requests/s and errors (non-200 or connection failures).  Aims: p99 <= 50 ms on 2 cores, Serve
within 2x of plain FastAPI (requests/s), no errors.  JSON: ``benchmarks/out/serve_latency-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_env, setup_logging, start_ray, table, write_json  # noqa: E402

from mechray.testing import free_port  # noqa: E402

log = logging.getLogger("bench.serve_latency")
LAYER = "blocks.1"


def build_store(path: Path, features: int, steps: int, rows: int) -> None:
    """A store of a small MLP's activations: ``steps`` shards, ``rows`` rows per layer each."""
    import torch

    from mechray import ActivationSampler

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Linear(16, features))
    model.add_module("blocks", torch.nn.Sequential(*[torch.nn.Sequential(
        torch.nn.Linear(features, features), torch.nn.GELU()) for _ in range(2)]))
    sampler = ActivationSampler(layers=["blocks.0", LAYER], save_dir=str(path), use_ray=False,
                                verbose=False)
    sampler.register_hooks(model)
    for step in range(steps):
        with torch.no_grad():
            model(torch.randn(rows, 16))
        sampler.save_activations(step)
    sampler.close()


def plain_server(store: str, port: int, stop) -> None:
    """Child process: the mixin on a plain FastAPI app under uvicorn (until ``stop`` is set).

    ``gc.freeze()`` after start-up, as Serve replicas do (``RAY_SERVE_FREEZE_GC_ON_STARTUP``):
    a full collection over torch's ~200k objects stalls every request ~100 ms otherwise."""
    import gc
    import threading

    import uvicorn
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin, MechIntConfig

    app = FastAPI()
    FastAPIIntegrationMixin(None, MechIntConfig(sample_layers=["*"], storage_path=store,
                                                verbose=False)).add_routes(app)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)),
                     daemon=True).start()
    gc.collect()
    gc.freeze()
    server.run()


def serve_server(store: str, port: int, stop, env: dict) -> None:
    """Child process: a local Ray (num_cpus=3) running ``mechray.serve:build_app`` on ``port``;
    ``env`` (e.g. ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) is set before Ray and Serve load."""
    import os

    os.environ.update(env)
    setup_env()
    logging.basicConfig(level=logging.WARNING)
    from ray import serve

    from mechray.api.serve_app import build_app

    ray = start_ray(num_cpus=3)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app({"storage": store, "max_ongoing_requests": 64}), name="mechray",
                  route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the load generator ----------------------------------------------------------------------
def request_bytes(method: str, path: str, body: Any = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "\r\n").encode() + data


async def one(reader, writer, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def load(port: int, raw: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    first: list[bytes] = []

    async def client(record_until: float, stop_at: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (now := time.perf_counter()) < stop_at:
                try:
                    status, body = await one(reader, writer, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                done = time.perf_counter()
                if now >= record_until:
                    latencies.append(done - now)
                    if status != 200:
                        errors.append(f"HTTP {status}: {body[:200]!r}")
                    elif not first:
                        first.append(body)
        finally:
            writer.close()

    t0 = time.perf_counter()
    warm_end, stop = t0 + 1.0, t0 + 1.0 + seconds
    await asyncio.gather(*(client(warm_end, stop) for _ in range(clients)))
    wall = time.perf_counter() - warm_end
    lat = sorted(latencies)
    pick = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa
    json.loads(first[0]) if first else None               # the body really is JSON
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": pick(0.50),
            "p90_ms": pick(0.90), "p99_ms": pick(0.99), "max_ms": 1000 * lat[-1] if lat else None,
            "errors": len(errors), "error_samples": errors[:3]}


def wait_ready(port: int, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


def run_cases(server: str, port: int, args) -> list[dict[str, Any]]:
    import httpx

    neuron = {"analysis_type": "neuron", "layer_name": LAYER}
    primed = httpx.post(f"http://127.0.0.1:{port}/interpret", json=neuron, timeout=120)
    assert primed.status_code == 200, primed.text
    cases = [("GET /interpret/layers", request_bytes("GET", "/interpret/layers")),
             ("POST /interpret (cached neuron)", request_bytes("POST", "/interpret", neuron))]
    rows = []
    for name, raw in cases:
        result = asyncio.run(load(port, raw, args.clients, args.seconds))
        rows.append({"server": server, "case": name, "clients": args.clients, **result})
        log.info("%s %s: p50 %.1f ms, p99 %.1f ms, %.0f req/s, %d errors", server, name,
                 result["p50_ms"] or -1, result["p99_ms"] or -1, result["rps"], result["errors"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--features", type=int, default=256, help="features per layer")
    parser.add_argument("--steps", type=int, default=8, help="shards in the store")
    parser.add_argument("--rows", type=int, default=512, help="rows per layer per shard")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--serve-env", action="append", default=[], metavar="RAY_SERVE_FLAG",
                        help="also run Serve with this env switch set to 1, e.g. "
                             "RAY_SERVE_THROUGHPUT_OPTIMIZED or RAY_SERVE_ENABLE_HA_PROXY")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_env()
    setup_logging(args.verbose)
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    store = Path(tempfile.mkdtemp(prefix="mechray-serve-bench-")) / "store"
    build_store(store, args.features, args.steps, args.rows)
    rows: list[dict[str, Any]] = []

    servers = [("fastapi", plain_server, ())]
    if not args.skip_serve:
        servers += [("serve", serve_server, ({},))]
        servers += [(f"serve+{k.removeprefix('RAY_SERVE_').lower()}", serve_server, ({k: "1"},))
                    for k in args.serve_env]
    ctx = multiprocessing.get_context("spawn")
    for name, target, extra in servers:
        port, stop = free_port(), ctx.Event()
        proc = ctx.Process(target=target, args=(str(store), port, stop, *extra))
        proc.start()
        try:
            wait_ready(port, timeout=180)
            rows += run_cases(name, port, args)
        finally:
            stop.set()
            proc.join(90)
            if proc.is_alive():
                log.warning("%s server did not stop in 90 s; terminating it", name)
                proc.terminate()

    cols = ["server", "case", "clients", "requests", "rps", "p50_ms", "p90_ms", "p99_ms",
            "max_ms", "errors"]
    print(table(rows, cols))
    by = {(r["server"], r["case"]): r for r in rows}
    ratios = {f"{server} {case}": by[("fastapi", case)]["rps"] / by[(server, case)]["rps"]
              for (server, case) in by if server != "fastapi"}
    for what, ratio in ratios.items():
        print(f"plain FastAPI serves {ratio:.2f}x the requests/s of {what}")
    write_json("serve_latency", {"args": vars(args), "machine": machine(), "results": rows,
                                 "fastapi_over_serve_rps": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
