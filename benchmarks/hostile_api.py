"""Hostile clients against the API in a server process: requests sent, 5xx, peak memory growth.

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/hostile_api.py --quick

Starts ``FastAPIIntegrationMixin`` under uvicorn in a child process (a captured TinyNet store, a
served SAE), then sends issue 19's API attacks over HTTP on 127.0.0.1: ``.pt`` pickles that
allocate from a number (``bytearray(2**30)`` alone and beside 48 MB of storage, a 2**26 memo
index, ``set(n)``, ``BYTEARRAY8``), expanded views, ``params.pretrained`` paths, ``eval_inputs``
beyond int64, a forged manifest summary (10^6 steps, a phantom layer, a lying total) and paging
after it.  Counts requests, answers by status, 5xx (aim 0) and the server's peak RSS (VmHWM)
growth over the refused uploads (aim < 50 MB).  ``--quick`` sends each attack once; without it,
``--rounds`` times.  Prints JSON and writes ``benchmarks/out/hostile_api.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Alloc:
    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


def _pt(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _with_pickle(pickled: bytes, tensors=None) -> bytes:
    import torch

    src = zipfile.ZipFile(io.BytesIO(_pt(tensors if tensors is not None
                                         else {"x": torch.ones(2, 2)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            z.writestr(info.filename, pickled if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


def _uploads() -> dict[str, bytes]:
    import torch

    good = zipfile.ZipFile(io.BytesIO(_pt({"x": torch.ones(2, 2)})))
    pkl = good.read(next(n for n in good.namelist() if n.endswith("data.pkl")))
    return {
        "bytearray(2**30)": _with_pickle(pickle.dumps({"x": _Alloc(2 ** 30)}, protocol=3)),
        "bytearray(2**30) + 48 MB": _with_pickle(pickle.dumps({"x": _Alloc(2 ** 30)}, protocol=3),
                                                 {"x": torch.zeros(12 << 20)}),
        "memo 2**26": _with_pickle(pkl[:2] + b"}r" + struct.pack("<I", 2 ** 26) + pkl[5:]),
        "set(2**30)": _with_pickle(b"\x80\x03cbuiltins\nset\nJ\x00\x00\x00\x40\x85R."),
        "BYTEARRAY8": _with_pickle(b"\x80\x05\x96" + struct.pack("<Q", 2 ** 30) + b"."),
        "expanded 4 GB": _pt(torch.zeros(1).expand(100_000, 10_000)),
    }


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(rounds: int = 1) -> dict:
    import httpx
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "api"))
    from test_api import capture_store
    from test_hostile_api import forge_summary

    from mechray.analysis.sae.model import SparseAutoencoder, save_saelens
    from mechray.testing import free_port

    tmp = Path(tempfile.mkdtemp(prefix="mechray-hostile-api-"))
    capture_store(tmp / "store")
    capture_store(tmp / "forged")
    forge_summary(tmp / "forged", lambda s: (
        s.update(shards=7), s["layers"].update(ghost=dict(s["layers"]["popt"])),
        s["layers"]["popt"].update(steps=[[0, 10 ** 6 - 1, 1]])))
    save_saelens(SparseAutoencoder(8, 16, "topk", 4), tmp / "sae", hook_name="popt")
    port = free_port()
    code = ("import sys, uvicorn; from fastapi import FastAPI; from conftest import TinyNet; "
            "from mechray import FastAPIIntegrationMixin, MechIntConfig; "
            "m = FastAPIIntegrationMixin(TinyNet(), MechIntConfig(sample_layers=['*'], "
            "storage_path=sys.argv[1], verbose=False), saes={'popt-sae': sys.argv[3]}); "
            "app = m.add_routes(FastAPI()); "
            "f = FastAPIIntegrationMixin(None, MechIntConfig(sample_layers=['*'], "
            "storage_path=sys.argv[4], verbose=False)); "
            "sub = f.add_routes(FastAPI()); app.mount('/forged', sub); "
            "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='error')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    server = subprocess.Popen([sys.executable, "-c", code, str(tmp / "store"), str(port),
                               str(tmp / "sae"), str(tmp / "forged")], env=env)
    statuses: Counter = Counter()
    fives: list[str] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.time() + 120
            while True:
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.3)

            def send(what, method, path, **kw):
                r = client.request(method, path, **kw)
                statuses[r.status_code] += 1
                if r.status_code >= 500:
                    fives.append(f"{what}: {r.text[:200]}")
                return r

            def upload(what, data):
                return send(what, "POST", "/interpret/upload", files={"file": ("x.pt", data)},
                            data={"analysis_type": "neuron"})

            upload("warm", _pt(torch.randn(64, 8)))
            bombs = _uploads()
            before = _peak(server.pid)
            per: dict[str, int] = {}
            for _ in range(rounds):
                for what, data in bombs.items():
                    start = _peak(server.pid)
                    upload(what, data)
                    per[what] = max(per.get(what, 0), _peak(server.pid) - start)
            grown = _peak(server.pid) - before
            for _ in range(rounds):
                for name in (str(tmp / "sae"), "~/.ssh/id_rsa.json", "/etc/passwd", "nope"):
                    send("pretrained", "POST", "/interpret", json={
                        "analysis_type": "sae", "layer_name": "popt",
                        "params": {"pretrained": name}})
                for value in (2 ** 63, 2 ** 70, -2 ** 63 - 1):
                    send("eval_inputs", "POST", "/interpret", json={
                        "analysis_type": "causal", "layer_name": "popt",
                        "eval_inputs": {"input_ids": [[1, value]]}})
                layers = send("forged layers", "GET", "/forged/interpret/layers")
                send("phantom", "POST", "/forged/interpret",
                     json={"analysis_type": "neuron", "layer_name": "ghost"})
                offset, pages = 0, 0
                while offset is not None and pages < 20:
                    page = send("page", "GET", "/forged/interpret/shards",
                                params={"offset": offset, "limit": 3}).json()
                    pages += 1
                    offset = page.get("next_offset")
        return {"requests": sum(statuses.values()), "by_status": dict(sorted(statuses.items())),
                "5xx": len(fives), "5xx_examples": fives[:5],
                "peak_rss_growth_mb_over_refused_uploads": round(grown / 2 ** 20, 1),
                "peak_rss_growth_mb_per_upload": {k: round(v / 2 ** 20, 1)
                                                  for k, v in per.items()},
                "largest_refused_upload_mb": round(len(bombs["bytearray(2**30) + 48 MB"])
                                                   / 2 ** 20, 1),
                "forged_layers_answer_kb": round(len(layers.content) / 1024, 1),
                "forged_paging_pages": pages, "forged_paging_finished": offset is None}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="each attack once")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = run(1 if args.quick else args.rounds)
    text = json.dumps(figures, indent=1)
    print(text)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile_api.json").write_text(text)


if __name__ == "__main__":
    main()
