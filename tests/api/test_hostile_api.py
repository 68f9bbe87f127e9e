"""Hostile and careless clients against the API (issue 13, defects 4-6, API side): checks before
memory is spent, no 5xx for a client's input, no internals in a 5xx body, a corrupt store named
with its repair command, a manifest parsed once per change, paged shards.

Over real HTTP: the FastAPI mixin under uvicorn in a thread (``serve_in_thread``), and for the
memory bounds a separate server process whose peak RSS (``VmHWM``) is read from /proc."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from test_api import LAYERS, capture_store

from mechray import FastAPIIntegrationMixin, MechIntConfig
from mechray.api.header import SUPPORTED_DTYPES
from mechray.api.routes import add_routes
from mechray.storage.reader import ShardStore
from mechray.testing import free_port, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def upload(client, data, analysis="neuron", **form):
    return client.post("/interpret/upload", files={"file": ("x.pt", data)},
                       data={"analysis_type": analysis, **form})


def error(r, status, code, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    for word in words:
        assert word in body["message"], (word, body["message"])
    return body


class _Alloc:
    """Pickles as ``bytearray(n)``: a call that allocates from a number in the stream."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


def with_pickle(pickled: bytes, tensors=None) -> bytes:
    """A torch.save archive of ``tensors`` whose data.pkl is replaced by ``pickled``."""
    src = zipfile.ZipFile(io.BytesIO(pt_bytes(tensors if tensors is not None
                                              else {"x": torch.ones(2, 2)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            z.writestr(info.filename, pickled if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


def alloc_bomb(n: int, tensors=None) -> bytes:
    """Issue 19 defect 1: a ~950-byte .pt whose data.pkl is ``{'x': bytearray(n)}``."""
    return with_pickle(pickle.dumps({"x": _Alloc(n)}, protocol=3), tensors)


def memo_bomb(index: int) -> bytes:
    """A valid tensor file whose pickle memoises at ``index``: C's unpickler grows its memo array
    to 2 x index pointers (2**26 -> 1 GiB), a dict in Python's."""
    good = zipfile.ZipFile(io.BytesIO(pt_bytes({"x": torch.ones(2, 2)})))
    pkl = good.read(next(n for n in good.namelist() if n.endswith("data.pkl")))
    assert pkl[2:5] == b"}q\x00"                        # the top dict, memoised at 0
    return with_pickle(pkl[:2] + b"}r" + struct.pack("<I", index) + pkl[5:])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "store"
    capture_store(path)
    return path


def serve_mixin(path, **fields):
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False, **fields)
    mixin = FastAPIIntegrationMixin(None, config)
    return mixin, mixin.add_routes(FastAPI())


@pytest.fixture(scope="module")
def api(store):
    mixin, app = serve_mixin(store)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, mixin
    mixin.close()


# --- defect 4: checks before memory -------------------------------------------------------------
def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_hostile_uploads_are_refused_before_the_server_spends_memory(tmp_path):
    """A 1.5 KB expanded view (4 GB dense), a 4 TB one, a 1-D upload of 10^6 values (a 600 MB
    answer), a 2,000-layer file, a 951-byte ``bytearray(2**30)`` pickle (issue 19 defect 1: +1 GB
    before), the same beside 48 MB of storage (the largest refused upload), and a memo index of
    2**26 (+1 GiB in C's unpickler): each answered without a 5xx, the server's peak RSS growing
    < 50 MB over them all."""
    port = free_port()
    code = ("import sys, uvicorn; from fastapi import FastAPI; "
            "from mechray import FastAPIIntegrationMixin, MechIntConfig; "
            "m = FastAPIIntegrationMixin(None, MechIntConfig(sample_layers=['*'], "
            "storage_path=sys.argv[1], verbose=False)); "
            "uvicorn.run(m.add_routes(FastAPI()), host='127.0.0.1', port=int(sys.argv[2]), "
            "log_level='warning')")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "none"), str(port)],
                              env=env)
    big = alloc_bomb(2 ** 30, {"x": torch.zeros(12 * 2 ** 20)})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.time() + 60
            while True:
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    assert time.time() < deadline and server.poll() is None, "server did not start"
                    time.sleep(0.2)
            ok = upload(client, pt_bytes(torch.randn(64, 8)))     # warm: imports, one analysis
            assert ok.status_code == 200, ok.text
            error(upload(client, alloc_bomb(16)), 422, "unreadable_upload", "bytearray")
            before = _peak_rss(server.pid)
            expanded = pt_bytes(torch.zeros(1).expand(100_000, 10_000))
            assert len(expanded) < 2000
            error(upload(client, expanded), 422, "expanded_upload", "[100000, 10000]")
            error(upload(client, pt_bytes(torch.zeros(1).expand(10 ** 6, 10 ** 6))), 422,
                  "expanded_upload")
            error(upload(client, pt_bytes(torch.randn(10 ** 6))), 422, "too_expensive",
                  "api_max_answer_mb")
            many = pt_bytes({f"l{i}": torch.ones(1, 2) for i in range(2000)})
            error(upload(client, many), 422, "too_many_layers")
            bomb = alloc_bomb(2 ** 30)
            assert len(bomb) < 1000
            for _ in range(2):
                error(upload(client, bomb), 422, "unreadable_upload", "bytearray(int)")
            assert len(big) > 48 * 2 ** 20
            error(upload(client, big), 422, "unreadable_upload", "bytearray(int)")
            r = upload(client, memo_bomb(2 ** 26))
            assert r.status_code == 200, r.text                 # a valid file, read cheaply
            grown = _peak_rss(server.pid) - before
        assert grown < 50 * 2 ** 20, f"peak RSS grew {grown / 2 ** 20:.0f} MiB"
    finally:
        server.terminate()
        server.wait(30)


def test_the_upload_unpickler_builds_only_what_a_tensor_file_needs(monkeypatch):
    """Issue 19 defect 1: every global's arguments are checked while parsing, and the opcodes
    that allocate from a number, build instances or state, or never end are refused."""
    from mechray.api import header, uploads
    from mechray.api.errors import ApiError

    built = []
    monkeypatch.setitem(uploads._LOADERS, "pt", lambda data: built.append(1))
    good = zipfile.ZipFile(io.BytesIO(pt_bytes({"x": torch.ones(2, 2)})))
    pkl = good.read(next(n for n in good.namelist() if n.endswith("data.pkl")))
    cases = {
        "bytearray(2**30)": (alloc_bomb(2 ** 30), "bytearray(int)"),
        "BYTEARRAY8": (with_pickle(b"\x80\x05\x96" + struct.pack("<Q", 2 ** 30) + b"."),
                       "bytearray of a size"),
        "set(int)": (with_pickle(b"\x80\x03cbuiltins\nset\nJ\x00\x00\x00\x40\x85R."),
                     "set(int)"),
        "torch.Size(int)": (with_pickle(b"\x80\x03ctorch\nSize\nJ\x00\x00\x00\x40\x85R."),
                            "torch.Size(int)"),
        "NEWOBJ": (with_pickle(b"\x80\x03ccollections\nOrderedDict\n)\x81."), "instance"),
        "BUILD": (with_pickle(pkl[:-1] + b"}b."), "state"),
        "ops": (with_pickle(b"\x80\x03" + b"N" * (header.MAX_PICKLE_OPS + 1) + b"."),
                "pickle operations"),
        "text persistent id": (with_pickle(b"\x80\x03P0\n."), "persistent id"),
        "wrong storage size": (with_pickle(pkl.replace(b"K\x04t", b"K\x05t")),
                               "declares 20 bytes"),
    }
    for what, (data, words) in cases.items():
        with pytest.raises(ApiError) as info:
            uploads.parse_upload(data, "x.pt")
        assert info.value.status == 422 and words in info.value.message, (what, info.value)
    assert not built                                   # nothing was loaded for any of them
    monkeypatch.setattr(header, "MAX_PICKLE_BYTES", len(pkl) - 1)
    with pytest.raises(ApiError) as info:
        uploads.parse_upload(with_pickle(pkl), "x.pt")
    assert info.value.code == "unsafe_upload" and "data.pkl" in info.value.message


def test_safetensors_uploads_read_their_header_first(api):
    """A declarative header: preferred for untrusted exchange; a header that claims more bytes
    than the file (or over the cap) is refused before it is read."""
    from safetensors.torch import save as st_save

    client, _ = api
    r = upload(client, st_save({"a": torch.randn(16, 3)}))
    assert r.status_code == 200 and r.json()["upload"]["format"] == "safetensors", r.text
    lying = struct.pack("<Q", 2 ** 40) + b'{"a": 1}' + b" " * 64
    r = upload(client, lying)
    assert r.status_code in (415, 422) and r.status_code < 500, r.text


def test_headers_are_checked_before_any_tensor_is_built(monkeypatch):
    from mechray.api import uploads
    from mechray.api.errors import ApiError
    from mechray.errors import MechrayError

    built = []
    monkeypatch.setitem(uploads._LOADERS, "pt", lambda data: built.append(1))
    shared = torch.ones(1024, 1024, dtype=torch.int8)  # 1 MB; 60 float32 copies would be 240 MB
    cases = {
        "expanded": (torch.zeros(1).expand(1000, 1000), "expanded_upload"),
        "float8": (torch.zeros(4, 3).to(torch.float8_e4m3fn), "unsupported_dtype"),
        "complex": (torch.zeros(4, 3, dtype=torch.complex64), "unsupported_dtype"),
        "sparse": (torch.eye(3).to_sparse(), "unsupported_layout"),
        "too many": ({f"l{i}": torch.ones(1, 2) for i in range(300)}, "too_many_layers"),
        "shared storage": ({f"l{i}": shared.t() for i in range(60)}, "expanded_upload"),
    }
    for what, (obj, code) in cases.items():
        with pytest.raises(MechrayError) as info:         # ApiError is one of mechray's errors
            uploads.parse_upload(pt_bytes(obj), "x.pt", max_layers=64)
        assert info.value.status == 422 and info.value.code == code, (what, info.value)
    assert not built                                  # nothing was loaded for any of them
    lie = io.BytesIO()
    np.save(lie, np.zeros((3, 4), np.float32))
    lying = lie.getvalue().replace(b"(3, 4)", b"(999999999, 4)")
    with pytest.raises(ApiError) as info:
        uploads.parse_upload(lying, "x.npy")
    assert info.value.code == "expanded_upload"


def test_unsupported_dtypes_and_layouts_are_4xx_naming_the_supported_ones(api):
    client, _ = api
    quantized = torch.quantize_per_tensor(torch.rand(4, 3), 0.1, 0, torch.quint8)
    from safetensors.torch import save as st_save

    cases = [(pt_bytes(torch.zeros(4, 3).to(torch.float8_e5m2)), "unsupported_dtype"),
             (st_save({"a": torch.zeros(4, 3).to(torch.float8_e4m3fn)}), "unsupported_dtype"),
             (pt_bytes(quantized), "unsupported_layout"),
             (pt_bytes({"a": torch.eye(4).to_sparse_csr()}), "unsupported_layout"),
             (pt_bytes(torch.eye(4).to_sparse()), "unsupported_layout")]
    for data, code in cases:
        body = error(upload(client, data), 422, code)
        named = SUPPORTED_DTYPES if code == "unsupported_dtype" else ("dense", "to_dense()")
        assert all(n in body["message"] for n in named), body
    ok = upload(client, pt_bytes(torch.ones(8, 3, dtype=torch.int8)))   # ints become float32
    assert ok.status_code == 200 and ok.json()["results"]["upload"]["mean"] == [1.0] * 3


# --- defect 6: no 500 for a client's input, no internals in a 5xx ---------------------------------
def test_deep_params_and_out_of_range_params_are_422_and_never_run(api, monkeypatch):
    client, mixin = api
    deep = "[" * 10_000 + "]" * 10_000
    error(upload(client, pt_bytes(torch.randn(16, 3)), params=deep), 422, "bad_params")
    nested = {"a": 1}
    for _ in range(100):
        nested = {"a": nested}
    error(upload(client, pt_bytes(torch.randn(16, 3)), params=json.dumps(nested)), 422,
          "bad_params", "deep")
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt",
                                        "params": nested})
    error(r, 422, "bad_params", "deep")
    body = '{"analysis_type": "neuron", "layer_name": "popt", "params": ' + \
        '{"a": ' * 5000 + "1" + "}" * 5001                  # deeper than json can parse
    r = client.post("/interpret", content=body, headers={"content-type": "application/json"})
    error(r, 422, "invalid_request", "nests too deeply")
    ran, cached = [], len(mixin.service.cache)
    monkeypatch.setattr(type(mixin.service), "_run", lambda self, plan: ran.append(plan))
    big = str(10 ** 30)
    error(upload(client, pt_bytes(torch.randn(16, 3)), "feature", params=f'{{"seed": {big}}}'),
          422, "bad_params", "seed")
    r = client.post("/interpret", json={"analysis_type": "feature", "layer_name": "popt",
                                        "params": {"seed": 10 ** 30}})
    error(r, 422, "bad_params", "seed")
    assert not ran and len(mixin.service.cache) == cached


def test_a_result_with_a_failure_inside_is_never_cached():
    from mechray.api.result_cache import Result, ResultCache

    cache = ResultCache(max_bytes=2 ** 20, max_entries=8)
    failed = Result.of({"analysis_type": "x"}, "results", {"a": {"skipped": True, "error": "E"}},
                       0.1)
    assert cache.put("k", failed) is False and cache.get("k") is None
    fine = Result.of({"analysis_type": "x"}, "result", {"mean": [1.0]}, 0.1)
    assert cache.put("k", fine) and json.loads(cache.get("k").render(True)) == {
        "analysis_type": "x", "result": {"mean": [1.0]}, "seconds": 0.1, "cached": True}


class _BrokenBackend:
    """A backend with a bug whose exception text holds what must never reach a client."""

    async def layers(self):
        raise RuntimeError("Traceback (most recent call last): File \"/srv/secret/app.py\", "
                           "pid=4242, ActorID(abc123)")


def test_a_5xx_carries_a_request_id_and_no_internals(caplog):
    app = FastAPI()
    add_routes(app, _BrokenBackend(), MechIntConfig(sample_layers=["*"], verbose=False))
    with serve_in_thread(app) as url:
        r = httpx.get(f"{url}/interpret/layers")
    body = error(r, 500, "internal_error")
    text = r.text
    assert body["request_id"] and body["request_id"] in body["message"]
    for secret in ("Traceback", "/srv/secret", "4242", "ActorID", "RuntimeError"):
        assert secret not in text, (secret, text)
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert body["request_id"] in logged and "/srv/secret" in logged


def test_a_corrupt_shard_is_503_store_corrupt_naming_the_file_and_the_repair(tmp_path):
    path = tmp_path / "store"
    capture_store(path)
    shard = sorted(path.glob("activations_*.pt"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    mixin, app = serve_mixin(path)
    try:
        with serve_in_thread(app) as url:
            r = httpx.post(f"{url}/interpret", json={"analysis_type": "neuron",
                                                     "layer_name": "popt"}, timeout=60)
    finally:
        mixin.close()
    body = error(r, 503, "store_corrupt", shard.name, "mechray repair")
    assert str(tmp_path) not in r.text and "/" not in body["message"].replace(shard.name, "")
    assert body["request_id"]


@pytest.mark.parametrize("damage", ["entries without layers", "a list", "truncated"])
def test_a_damaged_manifest_is_503_naming_the_repair_and_no_path(tmp_path, damage):
    path = tmp_path / "store"
    capture_store(path, steps=(0,))
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    if damage == "entries without layers":              # valid JSON, valid header, wrong shape
        for entry in doc["shards"]:
            del entry["layers"]
        manifest.write_text(json.dumps(doc))
    elif damage == "a list":
        manifest.write_text("[]")
    else:
        manifest.write_text(manifest.read_text()[:40])
    mixin, app = serve_mixin(path)
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for r in (client.get("/interpret/layers"),
                      client.post("/interpret", json={"analysis_type": "neuron",
                                                      "layer_name": "popt"})):
                body = error(r, 503, "store_unreadable", "mechray repair")
                assert str(tmp_path) not in r.text and body["request_id"]
    finally:
        mixin.close()


# --- defect 5, API side: parse on change only, health without parsing, paged shards ---------------
def test_the_manifest_is_parsed_only_when_it_changes(tmp_path, monkeypatch):
    """With api_manifest_ttl_s=0 the old timer re-parsed it on every request; now layers, shards,
    health and cached answers parse nothing until the manifest changes.  (Computing an analysis
    still has the engine re-read the store it runs on.)"""
    path = tmp_path / "store"
    capture_store(path, steps=(0, 1))
    parsed = []
    refresh = ShardStore.refresh
    monkeypatch.setattr(ShardStore, "refresh", lambda self: (parsed.append(1), refresh(self)))
    mixin, app = serve_mixin(path, api_manifest_ttl_s=0)
    neuron = {"analysis_type": "neuron", "layer_name": "popt"}
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["store_ready"] is True
            assert parsed == []                                # /health parses nothing
            first = client.get("/interpret/layers").json()
            assert len(parsed) == 1
            assert client.post("/interpret", json=neuron).json()["cached"] is False
            parsed.clear()
            for _ in range(5):
                client.get("/health")
                client.get("/interpret/layers")
                client.get("/interpret/shards")
                assert client.post("/interpret", json=neuron).json()["cached"] is True
            assert parsed == []
            capture_store(path, steps=(2,), seed=1)            # a new shard: the manifest changes
            after = client.get("/interpret/layers").json()
            assert len(parsed) == 1
            assert after["manifest_version"] != first["manifest_version"]
            assert after["layers"]["popt"]["steps"] == [0, 1, 2]
            assert client.post("/interpret", json=neuron).json()["cached"] is False
    finally:
        mixin.close()


def test_per_rank_manifests_alone_are_served_and_followed(tmp_path):
    """A store with only per-rank partial manifests (no merged manifest.json yet): ready, and a
    new rank's manifest is picked up."""
    path = tmp_path / "store"
    capture_store(path)
    doc = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").rename(path / "manifest.rank000.json")
    mixin, app = serve_mixin(path)
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["store_ready"] is True
            assert client.get("/interpret/layers").json()["layers"]["popt"]["shards"] == 4
            extra = dict(doc["shards"][0], file="activations_rank001_shard_000000_step_0.pt",
                         rank=1)
            (path / "manifest.rank001.json").write_text(json.dumps({**doc, "shards": [extra]}))
            assert client.get("/interpret/layers").json()["layers"]["popt"]["shards"] == 5
    finally:
        mixin.close()


def test_an_s3_manifest_is_parsed_only_when_its_etag_changes(s3_bucket, tmp_path, monkeypatch):
    """On S3 the view lists the manifests (ETag, size) and parses only when they changed."""
    from conftest import TinyNet

    from mechray import ActivationSampler

    monkeypatch.setenv("MECHRAY_CACHE_DIR", str(tmp_path / "cache"))
    endpoint, bucket = s3_bucket
    fields = dict(sample_layers=LAYERS, storage_backend="s3", s3_bucket=bucket, s3_prefix="exp",
                  s3_endpoint_url=endpoint, storage_path=str(tmp_path / "spool"), verbose=False,
                  use_ray=False)

    def capture(steps):
        net = TinyNet()
        with ActivationSampler(config=MechIntConfig(**fields)).attach(net) as sampler:
            for step in steps:
                sampler.current_step = step
                with torch.no_grad():
                    net(torch.randn(3, 5, 6))
                sampler.save_activations(step)

    capture((0, 1))
    parsed = []
    refresh = ShardStore.refresh
    monkeypatch.setattr(ShardStore, "refresh", lambda self: (parsed.append(1), refresh(self)))
    mixin = FastAPIIntegrationMixin(None, MechIntConfig(**fields, api_manifest_ttl_s=0))
    try:
        with serve_in_thread(mixin.add_routes(FastAPI())) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["store_ready"] is True and parsed == []
            assert client.get("/interpret/layers").json()["layers"]["popt"]["shards"] == 2
            parsed.clear()
            for _ in range(4):
                client.get("/interpret/layers")
                client.get("/interpret/shards")
            assert parsed == []
            capture((2,))
            assert client.get("/interpret/layers").json()["layers"]["popt"]["shards"] == 3
            assert len(parsed) == 1
    finally:
        mixin.close()


def test_shards_are_paged(api):
    client, _ = api
    whole = client.get("/interpret/shards").json()
    assert whole["total"] == 4 and len(whole["shards"]) == 4 and whole["next_offset"] is None
    pages, offset = [], 0
    while offset is not None:
        page = client.get("/interpret/shards", params={"offset": offset, "limit": 3}).json()
        assert page["total"] == 4 and page["limit"] == 3 and len(page["shards"]) <= 3
        pages += page["shards"]
        offset = page["next_offset"]
    assert pages == whole["shards"]
    error(client.get("/interpret/shards", params={"limit": 0}), 422, "invalid_request", "limit")
    error(client.get("/interpret/shards", params={"limit": 10 ** 6}), 422, "invalid_request")


def test_the_result_cache_is_bounded_in_bytes(store):
    mixin, app = serve_mixin(store, api_cache_mb=0.004)         # ~4 KB: one neuron answer fits
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for top_k in (1, 2, 3, 4, 5):
                r = client.post("/interpret", json={"analysis_type": "neuron",
                                                    "layer_name": "popt",
                                                    "params": {"top_k": top_k}})
                assert r.status_code == 200, r.text
                assert mixin.service.cache.nbytes <= 0.004 * 2 ** 20
            assert 0 < len(mixin.service.cache) < 5
    finally:
        mixin.close()


def test_a_bug_in_a_serve_replica_crosses_the_handle_as_a_request_id_only(caplog):
    from mechray.api.errors import ApiError
    from mechray.api.serve_app import _unwrap, _wrap

    def compute():
        raise RuntimeError("/srv/secret/model.py failed in pid 4242")

    out = _wrap(compute)
    with pytest.raises(ApiError) as info:
        _unwrap(out)
    body = info.value.body()
    assert info.value.status == 500 and body["error"] == "internal_error" and body["request_id"]
    assert "/srv/secret" not in json.dumps(body) and "4242" not in json.dumps(body)
    assert any(body["request_id"] in rec.getMessage() for rec in caplog.records)


def test_uploads_parse_under_a_concurrency_bound():
    import asyncio

    from mechray.api.errors import ApiError
    from mechray.api.routes import ParseSlots

    async def scenario():
        slots, inside, most = ParseSlots(2, wait_s=5), 0, 0

        async def parse():
            nonlocal inside, most
            async with slots:
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0.05)
                inside -= 1

        await asyncio.gather(*(parse() for _ in range(8)))
        assert most == 2
        busy = ParseSlots(1, wait_s=0.1)
        async with busy:
            with pytest.raises(ApiError) as info:
                async with busy:
                    pass
        assert info.value.status == 429 and info.value.headers["Retry-After"]

    asyncio.run(scenario())


def test_a_job_that_hits_a_bug_reports_a_request_id_only(caplog):
    from mechray.api.jobs import JobBoard

    def run(request):
        raise RuntimeError("/srv/secret/sae.py exploded in pid 4242")

    board = JobBoard(run, workers=1)
    try:
        job = board.submit("k", {}, analysis="sae")
        deadline = time.time() + 10
        while (status := json.loads(board.status(job["job_id"])))["status"] != "failed":
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        board.close()
    error = status["error"]
    assert error["error"] == "internal_error" and error["request_id"] in error["message"]
    assert "/srv/secret" not in json.dumps(status) and "4242" not in json.dumps(status)
    assert any(error["request_id"] in rec.getMessage() for rec in caplog.records)


# --- issue 19 defect 10: eval_inputs beyond int64 -------------------------------------------------
@pytest.mark.parametrize("value", [2 ** 63, 2 ** 70, -2 ** 63 - 1])
def test_eval_inputs_beyond_int64_are_422_naming_the_value(store, value):
    from conftest import TinyNet

    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(store), verbose=False)
    mixin = FastAPIIntegrationMixin(TinyNet(), config)
    try:
        with serve_in_thread(mixin.add_routes(FastAPI())) as url:
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                inputs = {"input_ids": [[1, 2]], key: [[1, value]]}
                r = httpx.post(f"{url}/interpret", json={
                    "analysis_type": "causal", "layer_name": "popt", "eval_inputs": inputs},
                    timeout=60)
                error(r, 422, "bad_eval_inputs", str(value)[:20], "64-bit", key)
    finally:
        mixin.close()


# --- issue 19 defect 12: a job whose result failed inside is not re-served -------------------------
def test_a_job_whose_result_failed_inside_runs_again_once_the_cause_is_gone(store, monkeypatch):
    from mechray.analysis.sae.analysis import SAEAnalysis

    real, calls = SAEAnalysis.fit, []

    def flaky(self, ctx, layer):              # the cause: fails on the first run only
        calls.append(layer)
        if len(calls) == 1:
            raise MemoryError("the machine was short of memory")
        return real(self, ctx, layer)

    monkeypatch.setattr(SAEAnalysis, "fit", flaky)
    mixin, app = serve_mixin(store)
    body = {"analysis_type": "sae", "layer_name": "popt",
            "params": {"expansion_factor": 2, "k": 4, "epochs": 1, "batch_size": 32}}
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            def run_job() -> tuple[str, dict]:
                r = client.post("/interpret", json=body)
                assert r.status_code == 202, r.text
                job_id, deadline = r.json()["job_id"], time.time() + 120
                while (job := client.get(f"/interpret/jobs/{job_id}").json())["status"] in \
                        ("queued", "running"):
                    assert time.time() < deadline, job
                    time.sleep(0.1)
                return job_id, job

            first, job = run_job()
            assert job["status"] == "done" and "MemoryError" in job["result"]["result"]["error"]
            second, job = run_job()
            assert second != first and len(calls) == 2
            assert job["status"] == "done" and "error" not in job["result"]["result"], job
            again = client.post("/interpret", json=body)             # a good one is kept
            assert again.status_code == 200 and again.json()["cached"] and len(calls) == 2
    finally:
        mixin.close()


# --- issue 19 defect 4: clients name served SAEs, never server paths -------------------------------
def test_pretrained_names_only_the_saes_the_server_was_started_with(store, tmp_path):
    from mechray.analysis.sae.model import SparseAutoencoder, save_saelens
    from mechray.errors import ConfigError

    torch.manual_seed(0)
    save_saelens(SparseAutoencoder(8, 16, "topk", 4), tmp_path / "popt_sae", hook_name="popt")
    save_saelens(SparseAutoencoder(4, 8, "topk", 2), tmp_path / "narrow", hook_name="x")
    (tmp_path / "secret.json").write_text('{"architecture": "gated"}')
    saes = {"popt-sae": str(tmp_path / "popt_sae"), "narrow": str(tmp_path / "narrow")}
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(store), verbose=False)
    with pytest.raises(ConfigError, match="missing"):                     # checked at start-up
        FastAPIIntegrationMixin(None, config, saes={"missing": str(tmp_path / "nothing")})
    mixin = FastAPIIntegrationMixin(None, config, saes=saes)

    def sae(client, name, layer="popt"):
        return client.post("/interpret", json={"analysis_type": "sae", "layer_name": layer,
                                               "params": {"pretrained": name}})
    try:
        with serve_in_thread(mixin.add_routes(FastAPI())) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            listed = client.get("/interpret/layers").json()["saes"]
            assert listed["popt-sae"]["d_in"] == 8 and listed["popt-sae"]["n_latents"] == 16
            assert listed["popt-sae"]["hook_name"] == "popt" and str(tmp_path) not in str(listed)
            r = sae(client, "popt-sae")
            assert r.status_code == 202, r.text
            deadline = time.time() + 120
            while (job := client.get(r.json()["poll"]).json())["status"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.1)
            result = job["result"]["result"]
            assert job["status"] == "done" and result["trained"] is False, job
            assert result["pretrained"]["name"] == "popt-sae" and "error" not in result
            assert str(tmp_path) not in json.dumps(job)               # no server path answered
            bodies = []
            for name in (str(tmp_path / "popt_sae"), str(tmp_path / "secret.json"),
                         str(tmp_path / "absent.json"), "~/popt_sae", "../popt_sae", "nope"):
                body = error(sae(client, name), 422, "unknown_sae", "--sae NAME=DIR")
                assert body["valid"] == ["narrow", "popt-sae"]
                assert "gated" not in body["message"]
                bodies.append(body["message"].replace(repr(name[:80]), "NAME"))
            assert len(set(bodies)) == 1           # an existing path answers as a missing one
            error(sae(client, "narrow"), 422, "sae_layer_mismatch", "reads 4 features", "8")
    finally:
        mixin.close()


# --- issue 19 defect 11: the summary at the manifest's head is checked before use -----------------
def forge_summary(store_dir: Path, edit) -> None:
    """Rewrite the summary in ``store_dir``'s manifest head with ``edit(summary)``."""
    path = store_dir / "manifest.json"
    text = path.read_text()
    i, j = text.index('"summary"'), text.index('"shards": [')
    head = json.loads("{" + text[i:j].rstrip().rstrip(",") + "}")
    edit(head["summary"])
    path.write_text(text[:i] + json.dumps(head)[1:-1] + ",\n " + text[j:])
    # a journal is tied to the manifest.json it extends (its size and tail): a forger who knows
    # the format removes it, so the forged head is the one readers take
    (store_dir / "manifest.journal").unlink(missing_ok=True)


def test_a_forged_summary_is_checked_against_the_entries(tmp_path):
    """A summary listing 10^6 steps (an 8.9 MB answer before), a phantom layer (a 500 before),
    and totals that lie (``next_offset == offset`` before: a client following pages looped)."""
    capture_store(tmp_path / "s")

    def edit(summary):
        summary["shards"] = 7                                       # the entries hold 4
        summary["layers"]["ghost"] = dict(summary["layers"]["popt"])
        summary["layers"]["popt"]["steps"] = [[0, 10 ** 6 - 1, 1]]

    forge_summary(tmp_path / "s", edit)
    mixin, app = serve_mixin(tmp_path / "s")
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            r = client.get("/interpret/layers")
            assert r.status_code == 200 and len(r.content) < 200_000, len(r.content)
            popt = r.json()["layers"]["popt"]
            # format 2 notices the edit (the head no longer matches its entries) and serves the
            # summary of the entries; a head it takes at its word is capped and checked instead
            assert popt["steps_total"] in (4, 10 ** 6), popt["steps_total"]
            assert len(popt["steps"]) == min(popt["steps_total"], 10_000)
            r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "ghost"})
            assert r.status_code == 404, r.text
            if "ghost" in client.get("/interpret/layers").json()["layers"]:
                error(r, 404, "layer_without_shards", "mechray repair --rebuild")
            r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt"})
            assert r.status_code == 200 and r.json()["result"]["num_samples"] == 60, r.text
            for limit in (1, 2, 3, 5):
                seen, offset, pages = [], 0, 0
                while offset is not None:
                    pages += 1
                    assert pages <= 10, f"paging by {limit} does not progress"
                    page = client.get("/interpret/shards",
                                      params={"offset": offset, "limit": limit}).json()
                    assert page["next_offset"] is None or page["next_offset"] > offset, page
                    seen += [s["file"] for s in page["shards"]]
                    offset = page["next_offset"]
                assert len(seen) == len(set(seen)) == 4, (limit, seen)
            beyond = client.get("/interpret/shards", params={"offset": 5, "limit": 2}).json()
            assert beyond["next_offset"] is None and beyond["total"] == 4
    finally:
        mixin.close()


def test_a_journal_head_claiming_ten_million_steps_costs_its_runs_not_a_list(tmp_path):
    """Defect 11's memory: a head taken at its word (the journal's last commit, forged with
    10^7 steps in one run) was expanded into a 10^7-item list for every `/interpret/layers`
    (+716 MB); its steps stay runs now and the answer pages the first 10,000."""
    import tracemalloc

    capture_store(tmp_path / "s")
    journal = tmp_path / "s" / "manifest.journal"
    last = [ln for ln in journal.read_text().splitlines() if ln.startswith('{"commit"')][-1]
    commit = json.loads(last)
    commit["commit"]["summary"]["layers"]["popt"]["steps"] = [[0, 10 ** 7 - 1, 1]]
    with journal.open("a") as fh:
        fh.write(json.dumps(commit, separators=(",", ":")) + "\n")
    assert len(ShardStore(tmp_path / "s").summaries()["popt"].steps) == 10 ** 7  # taken as is
    mixin, app = serve_mixin(tmp_path / "s")
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            tracemalloc.start()
            r = client.get("/interpret/layers")
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert r.status_code == 200 and len(r.content) < 200_000, len(r.content)
            popt = r.json()["layers"]["popt"]
            assert popt["steps_total"] == 10 ** 7 and popt["steps"] == list(range(10_000))
            assert peak < 50e6, f"{peak / 1e6:.0f} MB traced while answering"
    finally:
        mixin.close()


def test_a_request_is_planned_on_the_head_and_checked_on_the_entries_before_it_runs(
        tmp_path, monkeypatch):
    """The first `/interpret` after a change plans on the manifest head (the issue: 26 s and
    3.6 GB at 10^6 entries when it read them); a head that lies low or lists a phantom layer
    is caught on the entries before the run (422 over the limits, 404 for the phantom)."""
    from mechray.api.service import Interpreter
    from mechray.storage import manifest as mf

    capture_store(tmp_path / "s")
    neuron = {"analysis_type": "neuron", "layer_name": "popt"}
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(tmp_path / "s"), verbose=False)
    true_ops = Interpreter(None, config).plan(neuron).cost.ops
    journal = tmp_path / "s" / "manifest.journal"
    last = [ln for ln in journal.read_text().splitlines() if ln.startswith('{"commit"')][-1]
    commit = json.loads(last)
    layers = commit["commit"]["summary"]["layers"]
    layers["popt"].update(rows=1, max_shard_rows=1, steps=[[0, 0, 1]])   # lies low
    layers["ghost"] = dict(layers["popt"])                                # no entry holds it
    with journal.open("a") as fh:
        fh.write(json.dumps(commit, separators=(",", ":")) + "\n")
    loads = []
    real_load = mf.load
    monkeypatch.setattr(mf, "load", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    lie_ops = Interpreter(None, config).plan(neuron).cost.ops
    assert lie_ops < true_ops and loads == []             # planned on the head, no entry read
    mixin, app = serve_mixin(tmp_path / "s", api_max_cost=(lie_ops + true_ops) / 2)
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            error(client.post("/interpret", json=neuron), 422, "too_expensive")
            error(client.post("/interpret", json={**neuron, "layer_name": "ghost"}), 404,
                  "layer_without_shards", "mechray repair --rebuild")
    finally:
        mixin.close()
    mixin, app = serve_mixin(tmp_path / "s", api_max_cost=1)
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            loads.clear()
            error(client.post("/interpret", json=neuron), 422, "too_expensive")
            assert loads == []                            # refused on the plan: nothing parsed
    finally:
        mixin.close()
