"""`mechray serve` as a user starts it: its default proxy (Serve's HAProxy ingress) over real HTTP.

One ``mechray serve --storage <store> --port <free> --ray-address local`` process for the module
(its own local Ray); the answers are compared with the plain mixin's on the same store (FastAPI's
TestClient in this process): layers and shards the same, a cached analysis byte-identical to the
computed one, errors the same status and detail, 32 concurrent clients all answered, and Ctrl-C
leaving no HAProxy or Ray process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import capture_tiny
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mechray import FastAPIIntegrationMixin, MechIntConfig
from mechray.testing import free_port

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["mamba_backbone.blocks.1", "popt"]
NEURON = {"analysis_type": "neuron", "layer_name": "popt"}


def descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat[0] != "Z":
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, stack = {}, [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(process, base URL, store)`` of a running `mechray serve` with its default settings."""
    store = tmp_path_factory.mktemp("fast") / "store"
    capture_tiny(store, LAYERS, steps=(0, 1, 2))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS", "MECHRAY_API_TOKEN"))}
    log = (store.parent / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mechray.cli", "serve", "--storage", str(store), "--port",
         str(port), "--ray-address", "local"],
        env={**env, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        stdout=log, stderr=subprocess.STDOUT, cwd=store.parent, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, (store.parent / "serve.log").read_text()[-4000:]
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("`mechray serve` did not answer /health within 240 s: "
                             + (store.parent / "serve.log").read_text()[-4000:])
    yield proc, base, store
    if proc.poll() is None:                       # the last test stops it; this is the fallback
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture(scope="module")
def mixin(server):
    """The same store through the plain mixin in this process (the reference answers)."""
    _, _, store = server
    app = FastAPI()
    FastAPIIntegrationMixin(None, MechIntConfig(sample_layers=["*"], storage_path=str(store),
                                                verbose=False)).add_routes(app)
    with TestClient(app) as client:
        yield client


def test_the_default_proxy_is_haproxy(server):
    """HAProxy holds the served port (Serve's Python proxy only stands by, on another port, for
    scale-from-zero)."""
    proc, base, _ = server
    deadline = time.time() + 60           # on a loaded machine /health may answer before
    while True:                           # HAProxyManager has started HAProxy
        haproxy = [cmd.split() for cmd in descendants(proc.pid).values() if "bin/haproxy" in cmd]
        if haproxy or time.time() > deadline:
            break
        time.sleep(1)
    assert haproxy, descendants(proc.pid)
    config = Path(haproxy[-1][haproxy[-1].index("-f") + 1]).read_text()
    assert f"bind {base.removeprefix('http://')}" in config


def test_layers_and_shards_answer_as_the_mixin_does(server, mixin):
    _, base, _ = server
    for path in ("/interpret/layers", "/interpret/shards?offset=1&limit=2"):
        served, local = httpx.get(base + path, timeout=60), mixin.get(path)
        assert served.status_code == local.status_code == 200, served.text
        assert served.json() == local.json()
    assert sorted(httpx.get(base + "/interpret/layers").json()["layers"]) == sorted(LAYERS)


def test_a_cached_answer_is_identical_to_the_computed_one(server, mixin):
    _, base, _ = server
    first = httpx.post(base + "/interpret", json=NEURON, timeout=120)
    assert first.status_code == 200, first.text
    again = httpx.post(base + "/interpret", json=NEURON, timeout=60)
    assert again.status_code == 200 and again.json()["cached"] is True
    assert json.dumps(again.json()["result"], sort_keys=True) == \
        json.dumps(first.json()["result"], sort_keys=True)
    local = mixin.post("/interpret", json=NEURON).json()["result"]
    assert local.keys() == first.json()["result"].keys()
    assert first.json()["result"]["std"] == pytest.approx(local["std"], rel=1e-9)


def test_errors_pass_through_unchanged(server, mixin):
    _, base, _ = server
    for body in ({"analysis_type": "nueron"}, {"analysis_type": "neuron", "layer_name": "nope"}):
        served, local = httpx.post(base + "/interpret", json=body, timeout=60), \
            mixin.post("/interpret", json=body)
        assert served.status_code == local.status_code and 400 <= served.status_code < 500
        assert served.json() == local.json() and served.json()["error"]
    assert httpx.get(base + "/no/such/route").status_code == 404


def test_thirty_two_concurrent_clients_are_all_answered(server):
    _, base, _ = server

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            async def one(i: int) -> int:
                r = await (client.get("/interpret/layers") if i % 2 else
                           client.post("/interpret", json=NEURON))
                return r.status_code

            return await asyncio.gather(*(one(i) for i in range(64)))

    assert asyncio.run(run()) == [200] * 64


def test_hostile_uploads_cost_the_ingress_nothing_behind_haproxy(server):
    """Issue 19 defect 1 on `mechray serve`'s default path: a 951-byte ``bytearray(2**30)``
    pickle (+950 MB before) and the same beside 48 MB of storage, the largest upload it refuses:
    422 each, the ingress replica's peak RSS growing < 50 MB (the body streams to disk and only
    its headers are read)."""
    import torch
    from test_hostile_api import alloc_bomb
    from test_serve import _peak_rss

    proc, base, _ = server
    ingress = [pid for pid, cmd in descendants(proc.pid).items() if "MechrayIngress" in cmd]
    assert ingress, "no ingress replica below `mechray serve`"
    before = {pid: _peak_rss(pid) for pid in ingress}
    big = alloc_bomb(2 ** 30, {"x": torch.zeros(12 << 20)})
    with httpx.Client(base_url=base, timeout=120) as client:
        for data in (alloc_bomb(2 ** 30), alloc_bomb(2 ** 30), big):
            r = client.post("/interpret/upload", files={"file": ("x.pt", data)},
                            data={"analysis_type": "neuron"})
            assert r.status_code == 422 and "bytearray(int)" in r.json()["message"], r.text
    grown = max(_peak_rss(pid) - before[pid] for pid in ingress)
    assert grown < 50 * 2 ** 20, f"the ingress replica's peak RSS grew {grown / 2 ** 20:.0f} MiB"


def test_ctrl_c_stops_it_and_leaves_no_haproxy_or_ray_behind(server):
    proc, base, _ = server
    below = descendants(proc.pid)
    assert any("bin/haproxy" in cmd for cmd in below.values())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.5)
    left = {pid: cmd for pid, cmd in below.items() if _alive(pid)}
    assert not left, left
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
