"""Serve latency: the interpretation API through Ray Serve and through the plain mixin (uvicorn).

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --clients 32 --seconds 10 --features 256
    .venv/bin/python benchmarks/serve_latency.py --sweep 1,2,4,8,16,32,64 --seconds 3 \
        --plot benchmarks/plots/serve_clients.png          # costs as clients grow: table + PNG

Cases, each at ``--clients`` concurrent keep-alive clients for ``--seconds`` (after 1 s warm-up):

  GET  /interpret/layers                       the store's layers (cached per manifest version)
  POST /interpret {"analysis_type": "neuron"}  a cached analysis result (primed before the clock)

Servers (``--servers``, default all three), one after the other on 127.0.0.1 (free ports):

  fastapi       ``FastAPIIntegrationMixin(model, config).add_routes(FastAPI())`` under uvicorn,
                one worker process
  serve         ``mechray.serve:build_app`` as ``mechray serve`` runs it (the default): Serve's
                HAProxy ingress (:func:`mechray.api.serve_app.haproxy_env`, set before Ray
                starts) -> FastAPI ingress replica (answers layers and cached results itself) ->
                analysis replica; local Ray with num_cpus=3, one replica each, access logs off
  serve-python  the same with Serve's Python proxy (``mechray serve --proxy python``; the
                default before issue 11)
  serve+x       with ``--serve-env RAY_SERVE_X``: ``serve`` with Ray's switch ``RAY_SERVE_X=1``
                too (e.g. ``THROUGHPUT_OPTIMIZED``)

Each server runs in its own spawned process; all are started first (one after another), then
every (clients, case) runs on each server in turn - interleaved, so the shared machine's load
changes fall on all of them alike - and all are stopped at the end.

The client is a minimal asyncio HTTP/1.1 client in this process (pre-built requests, status line
and Content-Length parsing; every body's length checked, the first body of a case parsed), so
little of the CPU goes to load generation.  Reported per case: p50/p90/p99/max latency (ms),
requests/s and errors (non-200 or connection failures).  Aims: p99 <= 50 ms on 2 cores, default
Serve within 2x of plain FastAPI (p99 and requests/s, 32 clients), no errors.  ``--sweep`` runs
every case at each client count and prints p50/p99/req/s per server side by side; ``--plot``
draws them (matplotlib).  JSON: ``benchmarks/out/serve_latency-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
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


def serve_server(store: str, port: int, stop, proxy: str, env: dict) -> None:
    """Child process: a local Ray (num_cpus=3) running ``mechray.serve:build_app`` on ``port``
    behind ``proxy`` ("haproxy": the environment ``mechray serve`` sets; "python": Serve's
    Python proxy); ``env`` (e.g. ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) is set before Ray loads."""
    import os

    from mechray.api.serve_app import HA_PROXY, haproxy_env

    os.environ.update(env)
    os.environ.update(haproxy_env() if proxy == "haproxy" else {HA_PROXY: "0"})
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


CASES = ("GET /interpret/layers", "POST /interpret (cached neuron)")


def prime(port: int) -> dict[str, bytes]:
    """Compute the neuron result once (so the timed requests hit the cache); the raw requests."""
    import httpx

    neuron = {"analysis_type": "neuron", "layer_name": LAYER}
    primed = httpx.post(f"http://127.0.0.1:{port}/interpret", json=neuron, timeout=120)
    assert primed.status_code == 200, primed.text
    return {CASES[0]: request_bytes("GET", "/interpret/layers"),
            CASES[1]: request_bytes("POST", "/interpret", neuron)}


def run_interleaved(ports: dict[str, int], args, clients: list[int]) -> list[dict[str, Any]]:
    """Every (clients, case) on every server in turn, so the shared machine's load changes fall
    on all servers alike; the other servers idle meanwhile."""
    raws = {server: prime(port) for server, port in ports.items()}
    rows = []
    for n in clients:
        for case in CASES:
            for server, port in ports.items():
                result = asyncio.run(load(port, raws[server][case], n, args.seconds))
                rows.append({"server": server, "case": case, "clients": n, **result,
                             "load_1m": os.getloadavg()[0]})
                log.info("%s %s, %d clients: p50 %.1f ms, p99 %.1f ms, %.0f req/s, %d errors",
                         server, case, n, result["p50_ms"] or -1, result["p99_ms"] or -1,
                         result["rps"], result["errors"])
    return rows


def sweep_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    """One line per case and client count: p50, p99 and req/s of each server side by side."""
    by = {(r["server"], r["case"], r["clients"]): r for r in rows}
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for n in sorted({r["clients"] for r in rows}):
            line: dict[str, Any] = {"case": case, "clients": n}
            for sv in servers:
                r = by.get((sv, case, n))
                if r:
                    line |= {f"{sv} p50": r["p50_ms"], f"{sv} p99": r["p99_ms"],
                             f"{sv} req/s": r["rps"]}
            if "fastapi" in servers and "serve" in servers and by.get(("serve", case, n)):
                line["serve/fastapi p99"] = by[("serve", case, n)]["p99_ms"] / \
                    by[("fastapi", case, n)]["p99_ms"]
            out.append(line)
    cols = ["case", "clients"] + [c for c in out[0] if c not in ("case", "clients")]
    return table(out, cols)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """p99 latency and requests/s against clients, a line per server and case (log2 x)."""
    fig, (lat, thr) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    styles = {"GET /interpret/layers": "-", "POST /interpret (cached neuron)": "--"}
    colors = {sv: f"C{i}" for i, sv in enumerate(dict.fromkeys(r["server"] for r in rows))}
    for (server, case) in dict.fromkeys((r["server"], r["case"]) for r in rows):
        mine = sorted((r for r in rows if r["server"] == server and r["case"] == case),
                      key=lambda r: r["clients"])
        xs = [r["clients"] for r in mine]
        label = f"{server}: {case.split(' (')[0].replace('POST /interpret', 'cached POST')}"
        style = {"linestyle": styles.get(case, "-"), "color": colors[server], "marker": "o",
                 "label": label}
        lat.plot(xs, [r["p99_ms"] for r in mine], **style)
        thr.plot(xs, [r["rps"] for r in mine], **style)
    log2_axes(((lat, "p99 latency (ms)"), (thr, "requests/s")), "concurrent clients")
    lat.set_yscale("log")
    thr.legend(fontsize=7)
    save_figure(fig, path, title, fontsize=9)
    log.info("plot written to %s", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--features", type=int, default=256, help="features per layer")
    parser.add_argument("--steps", type=int, default=8, help="shards in the store")
    parser.add_argument("--rows", type=int, default=512, help="rows per layer per shard")
    parser.add_argument("--servers", default="fastapi,serve,serve-python",
                        help="comma-separated, from fastapi, serve, serve-python")
    parser.add_argument("--serve-env", action="append", default=[], metavar="RAY_SERVE_FLAG",
                        help="also run serve with this env switch set to 1, e.g. "
                             "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    parser.add_argument("--sweep", default=None, metavar="N,N,...",
                        help="client counts to run each case at (instead of --clients)")
    parser.add_argument("--plot", default=None, help="PNG of p99 and req/s against clients")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw --plot from an earlier run's out/serve_latency-*.json")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_env()
    setup_logging(args.verbose)
    if args.replot:
        doc = json.loads(Path(args.replot).read_text())
        before, after = doc["load_before"][0], doc["load_after"][0]
        plot(doc["results"], Path(args.plot or "serve_clients.png"),
             f"mechray API on {doc['machine']['host_cpus']} vCPUs, load {before:.1f}-{after:.1f}, "
             f"{Path(args.replot).stem.split('-')[1]}")
        return 0
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    store = Path(tempfile.mkdtemp(prefix="mechray-serve-bench-")) / "store"
    build_store(store, args.features, args.steps, args.rows)
    rows: list[dict[str, Any]] = []

    clients = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.clients]
    known = {"fastapi": (plain_server, ()), "serve": (serve_server, ("haproxy", {})),
             "serve-python": (serve_server, ("python", {}))}
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--servers {unknown}: choose from {sorted(known)}")
    servers = [(n, *known[n]) for n in names]
    servers += [(f"serve+{k.removeprefix('RAY_SERVE_').lower()}", serve_server,
                 ("haproxy", {k: "1"})) for k in args.serve_env]
    ctx = multiprocessing.get_context("spawn")
    running: list[tuple[str, Any, Any]] = []
    ports: dict[str, int] = {}
    try:
        for name, target, extra in servers:     # one at a time: start-up is CPU-heavy
            port, stop = free_port(), ctx.Event()
            proc = ctx.Process(target=target, args=(str(store), port, stop, *extra))
            proc.start()
            running.append((name, proc, stop))
            wait_ready(port, timeout=240)
            ports[name] = port
        load_before = os.getloadavg()
        rows += run_interleaved(ports, args, clients)
    finally:
        for _, _, stop in running:
            stop.set()
        for name, proc, _ in running:
            proc.join(90)
            if proc.is_alive():
                log.warning("%s server did not stop in 90 s; terminating it", name)
                proc.terminate()
    load_after = os.getloadavg()

    cols = ["server", "case", "clients", "requests", "rps", "p50_ms", "p90_ms", "p99_ms",
            "max_ms", "errors", "load_1m"]
    print(table(rows, cols))
    server_names = [sv for sv, _, _ in servers]
    if args.sweep:
        print(sweep_table(rows, server_names))
    by = {(r["server"], r["case"], r["clients"]): r for r in rows}
    ratios = {}
    for (server, case, n), r in by.items():
        base = by.get(("fastapi", case, n))
        if server != "fastapi" and base:
            ratios[f"{server} {case} @{n}"] = {"p99": r["p99_ms"] / base["p99_ms"],
                                               "rps": base["rps"] / r["rps"]}
    for what, ratio in ratios.items():
        print(f"{what}: p99 {ratio['p99']:.2f}x plain FastAPI's, req/s "
              f"{1 / ratio['rps']:.2f}x (FastAPI serves {ratio['rps']:.2f}x)")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    if args.plot:
        plot(rows, Path(args.plot), f"mechray API on {os.cpu_count()} vCPUs, load "
             f"{load_before[0]:.1f}-{load_after[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    write_json("serve_latency", {"args": vars(args), "machine": machine(), "results": rows,
                                 "over_fastapi": ratios, "load_before": load_before,
                                 "load_after": load_after})
    return 0


if __name__ == "__main__":
    sys.exit(main())
