"""The interpretation API through FastAPI's TestClient: every route, every error class, uploads in
every accepted format, a crafted pickle that must execute nothing, jobs, caching, auth, and a
schemathesis fuzz of the OpenAPI schema that must find no 5xx.  Real captured shards throughout
(TinyNet, Pattern 2 capture); no Ray here (see test_serve.py for Ray Serve and Ray tasks)."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import zipfile

import hypothesis
import numpy as np
import pytest
import torch
from conftest import TinyNet
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mechray import ActivationSampler, FastAPIIntegrationMixin, MechIntConfig
from mechray.analysis.engine import Engine

LAYERS = ["mamba_backbone.blocks.1", "popt"]
TOKEN_ENV = "MECHRAY_API_TOKEN"
SMALL_SAE = {"expansion_factor": 2, "k": 4, "epochs": 2, "batch_size": 32}


def capture_store(path, steps=(0, 1, 2, 3), seed=0, save_inputs=True):
    """TinyNet's activations for ``steps`` (3x5 tokens a step), inputs saved for causal/circuit."""
    torch.manual_seed(seed)
    net = TinyNet()
    sampler = ActivationSampler(layers=LAYERS, save_dir=str(path), use_ray=False, verbose=False,
                                save_inputs=save_inputs)
    sampler.register_hooks(net)
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        sampler.current_step = step
        with torch.no_grad():
            net(torch.randn(3, 5, 6, generator=g))
        sampler.save_activations(step)
    sampler.close()
    return net


def make_client(model, path, **fields):
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False, **fields)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config)
    mixin.add_routes(app)
    return TestClient(app), mixin


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    return capture_store(path), path


@pytest.fixture(scope="module")
def api(store):
    client, mixin = make_client(*store)
    yield client
    mixin.close()


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def poll(client, job_id, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"/interpret/jobs/{job_id}").json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def assert_error(response, status, code, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"], body
    for word in words:
        assert word in body["message"], (word, body["message"])
    return body


# --- the seed's routes -----------------------------------------------------------------------
def test_layers_shards_health_and_dashboard(api, store):
    layers = api.get("/interpret/layers").json()
    assert sorted(layers["layers"]) == sorted(LAYERS)
    popt = layers["layers"]["popt"]
    assert popt == {"feature_shape": [8], "dtype": "float32", "shards": 4, "rows": 60,
                    "steps": [0, 1, 2, 3], "steps_total": 4}
    shards = api.get("/interpret/shards").json()
    assert [s["step"] for s in shards["shards"]] == [0, 1, 2, 3]
    assert shards["manifest_version"] == layers["manifest_version"]
    assert api.get("/health").json() == {"status": "ok", "version": "0.1.0", "store_ready": True,
                                         "ray": False, "model": True, "texts": False,
                                         "jobs_pending": 0}
    for path in ("/", "/interpret/dashboard"):
        page = api.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<table id=\"layers\">" in page.text and "<script>" in page.text
        assert "cdn" not in page.text.lower() and "src=" not in page.text     # self-contained


def test_neuron_analysis_matches_the_engine_and_is_cached(api, store):
    request = {"analysis_type": "neuron", "layer_name": "popt"}     # the seed's curl example
    first = api.post("/interpret", json=request)
    assert first.status_code == 200, first.text
    body = first.json()
    direct = Engine(str(store[1]), use_ray=False, progress=False).run(["neuron"], layers=["popt"])
    assert body["result"]["mean"] == pytest.approx(direct["neuron"]["popt"]["mean"], rel=1e-12)
    assert body["result"]["num_samples"] == 60 and body["cached"] is False
    assert body["params"] == {"eps": 1e-6, "top_k": 5}
    again = api.post("/interpret", json={**request, "params": {"top_k": 5}}).json()
    assert again["cached"] is True and again["result"] == body["result"]


@pytest.mark.parametrize("analysis,key", [("feature", "explained_variance_ratio"),
                                          ("dynamics", "subspace_overlap"),
                                          ("causal", "ranked"), ("circuit", "ranked")])
def test_every_analysis_runs_over_http(api, analysis, key):
    params = {"n_components": 3, "n_clusters": 3, "batch_size": 32} if analysis == "feature" else {}
    r = api.post("/interpret", json={"analysis_type": analysis, "layer_name": "popt",
                                     "params": params})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert not result.get("skipped"), result
    assert key in result


def test_a_job_poll_with_wait_answers_when_the_job_ends_or_when_the_wait_is_over(api):
    """``GET /interpret/jobs/{id}?wait=S`` holds the request until the job ends or S seconds
    pass (long polling: the dashboard's headless test no longer races its virtual clock)."""
    r = api.post("/interpret", json={"analysis_type": "sae", "layer_name": "popt",
                                     "params": {**SMALL_SAE, "seed": 7}})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    for _ in range(60):
        t0 = time.monotonic()
        body = api.get(f"/interpret/jobs/{job}", params={"wait": 2}).json()
        if body["status"] in ("done", "failed"):
            break
        assert time.monotonic() - t0 >= 1.9, body     # a running job is never answered early
    assert body["status"] == "done", body
    assert body["result"]["result"]["n_latents"] == 16
    for bad in ("31", "-1", "soon"):
        assert_error(api.get(f"/interpret/jobs/{job}", params={"wait": bad}), 422,
                     "invalid_request", "wait")


def test_sae_runs_as_a_job_polled_to_completion(api):
    request = {"analysis_type": "sae", "layer_name": "popt", "params": SMALL_SAE}
    r = api.post("/interpret", json=request)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert r.headers["location"] == accepted["poll"] == f"/interpret/jobs/{accepted['job_id']}"
    done = poll(api, accepted["job_id"])
    assert done["status"] == "done", done
    result = done["result"]["result"]
    assert 0 < result["l0"] <= 4 and result["n_latents"] == 16 and "explained_variance" in result
    # SMALL_SAE trains 2 epochs of a small store: a handful of steps, and the answer says so
    assert result["converged"] is False and result["train"]["steps"] < 200
    assert any("optimizer steps" in w for w in result["warnings"]), result["warnings"]
    assert result["saelens_path"] is None or isinstance(result["saelens_path"], str)
    again = api.post("/interpret", json=request)              # now answered from the cache
    assert again.status_code == 200 and again.json()["cached"] is True


def test_cost_threshold_sends_requests_to_jobs_and_refuses_huge_ones(store, tmp_path):
    client, mixin = make_client(store[0], store[1], api_job_cost=0)
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt"})
    assert r.status_code == 202 and poll(client, r.json()["job_id"])["status"] == "done"
    mixin.close()
    client, mixin = make_client(store[0], store[1], api_max_cost=1e3)
    assert_error(client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt"}),
                 422, "too_expensive", "api_max_cost")
    mixin.close()


def test_a_new_shard_invalidates_cached_results(tmp_path):
    capture_store(tmp_path, steps=(0, 1))
    client, mixin = make_client(None, tmp_path)
    request = {"analysis_type": "neuron", "layer_name": "popt"}
    before = client.post("/interpret", json=request).json()
    assert client.post("/interpret", json=request).json()["cached"] is True
    capture_store(tmp_path, steps=(2,), seed=1)                 # one more shard lands
    after = client.post("/interpret", json=request).json()
    assert after["cached"] is False and after["manifest_version"] != before["manifest_version"]
    assert after["result"]["num_samples"] == before["result"]["num_samples"] + 15
    assert client.get("/interpret/layers").json()["layers"]["popt"]["shards"] == 3
    mixin.close()


def test_an_s3_store_is_served_and_a_new_shard_invalidates_it(s3_bucket, tmp_path, monkeypatch):
    """A store on a real HTTP S3 server (moto): the config's S3 location is the default."""
    monkeypatch.setenv("MECHRAY_CACHE_DIR", str(tmp_path / "cache"))
    endpoint, bucket = s3_bucket
    fields = dict(sample_layers=LAYERS, storage_backend="s3", s3_bucket=bucket, s3_prefix="exp",
                  s3_endpoint_url=endpoint, storage_path=str(tmp_path / "spool"), verbose=False,
                  use_ray=False)

    def capture(steps, seed):
        torch.manual_seed(seed)
        net = TinyNet()
        with ActivationSampler(config=MechIntConfig(**fields)).attach(net) as sampler:
            for step in steps:
                sampler.current_step = step
                with torch.no_grad():
                    net(torch.randn(3, 5, 6))
                sampler.save_activations(step)
        return net

    capture((0, 1), 0)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(None, MechIntConfig(**fields, api_manifest_ttl_s=0))
    mixin.add_routes(app)
    client = TestClient(app)
    layers = client.get("/interpret/layers").json()
    assert layers["store"] == f"s3://{bucket}/exp" and layers["layers"]["popt"]["shards"] == 2
    request = {"analysis_type": "neuron", "layer_name": "popt"}
    first = client.post("/interpret", json=request).json()
    assert first["result"]["num_samples"] == 30
    assert client.post("/interpret", json=request).json()["cached"] is True
    capture((2,), 1)
    after = client.post("/interpret", json=request).json()
    assert after["cached"] is False and after["result"]["num_samples"] == 45
    mixin.close()


def test_seed_pattern_4_and_its_curl_examples_work_as_written(tmp_path, monkeypatch):
    """The quick reference end to end: Pattern 2 capture into ./mechint_cache, Pattern 4 on a
    plain FastAPI app under uvicorn (127.0.0.1), then the seed's three curl commands."""
    import shlex
    import shutil
    import subprocess
    from collections import OrderedDict

    from mechray import MechIntHooks
    from mechray.testing import serve_in_thread

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(6, 8),
                                            layer2=torch.nn.Linear(8, 4)))
    config = MechIntConfig(sample_layers=["layer1", "layer2"], save_hidden_every_n_steps=2,
                           verbose=False, use_ray=False)
    hooks = MechIntHooks(config)                                     # Pattern 2
    hooks.register_hooks(model)
    for step in range(6):
        model(torch.randn(4, 6))
        if step % config.save_hidden_every_n_steps == 0:
            hooks.sampler.save_activations(step)
            hooks.sampler.clear_cache()
    hooks.close()
    torch.save({"layer1": torch.randn(32, 8)}, "activations.pt")

    app = FastAPI()                                                  # Pattern 4
    mixin = FastAPIIntegrationMixin(model, config)
    mixin.add_routes(app)

    seed = """
curl http://localhost:8000/interpret/layers
curl -X POST http://localhost:8000/interpret \\
  -H "Content-Type: application/json" \\
  -d '{"analysis_type": "neuron", "layer_name": "layer1"}'
curl -X POST http://localhost:8000/interpret/upload \\
  -F "file=@activations.pt" \\
  -F "analysis_type=feature"
"""
    try:
        answers = []
        with serve_in_thread(app) as url:
            for command in seed.replace("\\\n", " ").strip().splitlines():
                argv = shlex.split(command.replace("http://localhost:8000", url))
                out = subprocess.run(argv + ["-s", "--fail-with-body"], capture_output=True,
                                     text=True, timeout=60)
                assert out.returncode == 0, (command, out.stdout, out.stderr)
                answers.append(json.loads(out.stdout))
    finally:
        mixin.close()
    layers, neuron, upload = answers
    assert sorted(layers["layers"]) == ["layer1", "layer2"] and layers["store"].endswith(
        "mechint_cache")
    assert layers["layers"]["layer1"]["steps"] == [0, 2, 4]
    assert neuron["result"]["num_samples"] == 20 and len(neuron["result"]["mean"]) == 8
    assert upload["upload"]["layers"] == {"layer1": [32, 8]}
    assert upload["results"]["layer1"]["explained_variance_ratio"]


# --- uploads ---------------------------------------------------------------------------------
def _upload(client, data, analysis="neuron", filename="acts.pt", **form):
    return client.post("/interpret/upload", files={"file": (filename, data)},
                       data={"analysis_type": analysis, **form})


def test_upload_every_format_and_sniff_the_content(api):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    y = torch.randn(40, 4, generator=torch.Generator().manual_seed(4))
    from safetensors.torch import save as st_save

    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, x.numpy())
    np.savez(npz, a=x.numpy(), b=y.numpy())
    cases = {"pt dict": (pt_bytes({"a": x, "b": y}), {"a": [40, 6], "b": [40, 4]}, "pt"),
             "pt tensor": (pt_bytes(x), {"upload": [40, 6]}, "pt"),
             "pt shard": (pt_bytes({"activations": {"a": x}, "metadata": {}}), {"a": [40, 6]},
                          "pt"),
             "safetensors": (st_save({"a": x, "b": y}), {"a": [40, 6], "b": [40, 4]},
                             "safetensors"),
             "npy named .pt": (npy.getvalue(), {"upload": [40, 6]}, "npy"),
             "npz": (npz.getvalue(), {"a": [40, 6], "b": [40, 4]}, "npz")}
    for what, (data, shapes, kind) in cases.items():
        r = _upload(api, data)
        assert r.status_code == 200, (what, r.text)
        body = r.json()
        assert body["upload"]["format"] == kind and body["upload"]["layers"] == shapes, what
        first = next(iter(shapes))
        expect = x.double().mean(0) if shapes[first][1] == 6 else y.double().mean(0)
        assert body["results"][first]["mean"] == pytest.approx(expect.tolist(), rel=1e-6), what
    r = _upload(api, pt_bytes({"a": x, "b": y}), "feature", layer_name="b",
                params=json.dumps({"n_components": 2, "n_clusters": 2}))
    assert r.status_code == 200 and list(r.json()["results"]) == ["b"]
    assert r.json()["results"]["b"]["n_components"] == 2
    sae = _upload(api, pt_bytes({"a": x}), "sae", params=json.dumps(SMALL_SAE))
    assert sae.status_code == 202
    done = poll(api, sae.json()["job_id"])
    assert done["status"] == "done" and done["result"]["results"]["a"]["n_latents"] == 12


class _RunsCommand:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_executes_nothing(api, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCommand(marker))
    proof = tmp_path / "proof"                      # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(_RunsCommand(proof)))
    assert proof.exists()
    assert_error(_upload(api, payload), 415, "unsupported_format", "pickle")
    assert_error(_upload(api, pt_bytes({"a": _RunsCommand(marker)})), 422, "unreadable_upload",
                 "pickled code never runs")
    assert_error(_upload(api, pt_bytes(_RunsCommand(marker)), filename="x.npy"), 422,
                 "unreadable_upload")
    obj = io.BytesIO()
    np.save(obj, np.array([_RunsCommand(marker)], dtype=object), allow_pickle=True)
    assert_error(_upload(api, obj.getvalue(), filename="x.npy"), 422, "unreadable_upload")
    legacy = io.BytesIO()
    torch.save({"a": torch.ones(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    assert_error(_upload(api, legacy.getvalue()), 415, "unsupported_format", "pickle")
    assert not marker.exists()


def test_bad_uploads_are_4xx_naming_the_problem(api):
    assert_error(_upload(api, b""), 422, "empty_upload")
    assert_error(_upload(api, b"hello world, not a tensor"), 415, "unsupported_format")
    assert_error(_upload(api, pt_bytes({"../evil": torch.ones(3, 2)})), 422,
                 "path_like_layer_name")
    assert_error(_upload(api, pt_bytes({"a": [1, 2]})), 422, "bad_upload_content", "not a tensor")
    assert_error(_upload(api, pt_bytes({"a": torch.zeros(0, 3)})), 422, "bad_upload_content")
    assert_error(_upload(api, pt_bytes({"a": torch.ones(4, 2)}), layer_name="b"), 404,
                 "unknown_layer", "['a']")
    assert_error(_upload(api, pt_bytes(torch.ones(4, 2)), params="{nope"), 422, "bad_params")
    assert_error(_upload(api, pt_bytes(torch.ones(4, 2)), "nope"), 422, "unknown_analysis")
    zipped = io.BytesIO()                           # a .pt whose entries are deflated: refused
    with zipfile.ZipFile(io.BytesIO(pt_bytes(torch.ones(64, 64)))) as src, \
            zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert_error(_upload(api, zipped.getvalue()), 422, "unsafe_upload", "compressed")
    r = api.post("/interpret/upload", data={"analysis_type": "neuron"})
    assert_error(r, 422, "invalid_request", "file")


def test_upload_size_limit_is_413_without_reading_the_whole_body(store):
    client, mixin = make_client(None, store[1], api_max_upload_mb=0.05)
    big = pt_bytes(torch.zeros(64 * 1024))                      # 256 KiB > 50 KiB + overhead
    assert_error(_upload(client, big), 413, "too_large", "api_max_upload_mb")
    # Streamed without Content-Length, straight into the ASGI app: it must stop reading at the cap.
    pulled = []

    async def receive():
        if not pulled:
            body = (b"--B\r\nContent-Disposition: form-data; name=\"analysis_type\"\r\n\r\n"
                    b"neuron\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; "
                    b"filename=\"a.pt\"\r\nContent-Type: application/octet-stream\r\n\r\n")
        else:
            body = b"\0" * 16384
        pulled.append(len(body))
        return {"type": "http.request", "body": body, "more_body": len(pulled) < 1024}  # 16 MiB

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/interpret/upload", "raw_path": b"/interpret/upload",
             "root_path": "", "query_string": b"", "server": ("testserver", 80),
             "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"testserver"),
                         (b"content-type", b"multipart/form-data; boundary=B")]}
    import asyncio

    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"too_large" in sent[1]["body"]
    assert sum(pulled) < 50 * 1024 + 64 * 1024 + 2 * 16384, f"read {sum(pulled)} bytes"
    mixin.close()


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "a/b", "..", "~root",
                                  "C:\\x", "popt/../../x", ".hidden"])
def test_path_like_layer_names_are_refused(api, name):
    assert_error(api.post("/interpret", json={"analysis_type": "neuron", "layer_name": name}),
                 422, "path_like_layer_name", "looks like a file path")


def test_unknown_layer_analysis_job_and_bad_params_name_the_valid_values(api):
    body = assert_error(api.post("/interpret", json={"analysis_type": "neuron",
                                                     "layer_name": "popx"}),
                        404, "unknown_layer", "popx", "did you mean popt")
    assert body["valid"] == sorted(LAYERS)
    body = assert_error(api.post("/interpret", json={"analysis_type": "nueron",
                                                     "layer_name": "popt"}),
                        422, "unknown_analysis", "nueron", "neuron")
    assert {"neuron", "feature", "sae", "causal", "circuit", "dynamics"} <= set(body["valid"])
    assert_error(api.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt",
                                              "params": {"top_k": 10 ** 9}}),
                 422, "bad_params", "top_k", "1000")
    assert_error(api.post("/interpret", json={"analysis_type": "feature", "layer_name": "popt",
                                              "params": {"n_clusterz": 3}}),
                 422, "bad_params", "n_clusterz", "n_clusters")
    assert_error(api.post("/interpret", json={"analysis_type": "sae", "layer_name": "popt",
                                              "params": {"n_latents": 10 ** 7}}),
                 422, "bad_params", "n_latents")
    assert_error(api.get("/interpret/jobs/" + "0" * 32), 404, "unknown_job")
    assert_error(api.get("/interpret/jobs/nope"), 422, "invalid_request", "job_id")


@pytest.mark.parametrize("analysis", ["causal", "circuit"])
def test_params_that_import_code_are_refused(api, analysis):
    for params in ({"metric": "loss", "loss_fn": "os:system"}, {"loss_fn": "subprocess:run"},
                   {"metric": "loss"}):
        assert_error(api.post("/interpret", json={"analysis_type": analysis, "layer_name": "popt",
                                                  "params": params}),
                     422, "code_param_refused", "never")


def test_malformed_requests_are_422_naming_the_field(api):
    assert_error(api.post("/interpret", json={"analysis_type": "neuron"}), 422,
                 "invalid_request", "layer_name", "Field required")
    assert_error(api.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt",
                                              "params": {}, "extra": 1}),
                 422, "invalid_request", "extra", "valid fields")
    assert_error(api.post("/interpret", content=b"{not json",
                          headers={"content-type": "application/json"}),
                 422, "invalid_request", "JSON")
    assert_error(api.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt",
                                              "params": [1]}), 422, "invalid_request", "params")
    assert_error(api.post("/interpret", json={"analysis_type": "neuron", "layer_name": "x" * 300}),
                 422, "invalid_request", "layer_name")
    big = {"analysis_type": "neuron", "layer_name": "popt", "params": {"x": "y" * 100_000}}
    assert_error(api.post("/interpret", json=big), 413, "too_large", "api_max_json_kb")


def test_no_store_yet_is_404_and_uploads_still_work(tmp_path):
    client, mixin = make_client(None, tmp_path / "empty")
    assert_error(client.get("/interpret/layers"), 404, "no_store", "nothing was captured")
    assert client.get("/health").json()["store_ready"] is False
    assert _upload(client, pt_bytes(torch.randn(20, 3))).status_code == 200
    mixin.close()


# --- auth ------------------------------------------------------------------------------------
def test_bearer_auth_on_and_off(api, monkeypatch):
    request = {"analysis_type": "neuron", "layer_name": "popt"}
    assert api.get("/interpret/layers").status_code == 200          # off: open
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                    {"Authorization": "Basic s3cret-token"}):
        assert_error(api.get("/interpret/layers", headers=headers), 401, "unauthorized",
                     "Bearer")
        assert_error(api.post("/interpret", json=request, headers=headers), 401, "unauthorized")
        r = _upload(api, pt_bytes(torch.ones(3, 2)))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    good = {"Authorization": "Bearer s3cret-token"}
    assert api.get("/interpret/layers", headers=good).status_code == 200
    assert api.post("/interpret", json=request, headers=good).status_code == 200
    assert api.get("/health").status_code == 200 and api.get("/").status_code == 200


# --- the schema ------------------------------------------------------------------------------
def test_openapi_schema_is_complete(api):
    schema = api.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/interpret", "/interpret/layers", "/interpret/shards", "/interpret/upload",
            "/interpret/jobs/{job_id}", "/health"} <= set(paths)
    ok = paths["/interpret"]["post"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"]["$ref"].endswith("InterpretResponse")
    assert ok["202"]["content"]["application/json"]["schema"]["$ref"].endswith("JobAccepted")
    assert ok["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    upload = paths["/interpret/upload"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    assert {"InterpretRequest", "LayersResponse", "JobStatus", "UploadResponse",
            "HealthResponse"} <= set(schema["components"]["schemas"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


@pytest.fixture(scope="module")
def fuzz_app(store):
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(store[1]), verbose=False,
                           api_max_cost=2e8, api_max_pending_jobs=4)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(store[0], config)
    mixin.add_routes(app)
    yield app
    mixin.close()


def test_fuzzed_requests_never_get_a_5xx(fuzz_app):
    """Schema-driven requests, valid and invalid (schemathesis + hypothesis, 50 per operation
    and mode): never a 5xx, and every answer is documented in the schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
              schemathesis.checks.content_type_conformance,
              schemathesis.checks.response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    calls = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.settings(max_examples=50, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                calls.append(case.call_and_validate(checks=checks).status_code)

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:     # nothing invalid to send (no inputs)
                assert mode == GenerationMode.NEGATIVE
    assert len(calls) > 300 and {200, 404, 422} <= set(calls), sorted(set(calls))


def test_skip_reasons_over_http_say_what_to_send_or_how_to_start_the_server(tmp_path):
    """A store without inputs: causal says which request field to send (no tokenizer: ids),
    never Python advice; a server without a model says how to start one with it."""
    store = capture_store(tmp_path / "bare", steps=(0,), save_inputs=False), tmp_path / "bare"
    with_model, mixin = make_client(*store)
    try:
        r = with_model.post("/interpret", json={"analysis_type": "causal", "layer_name": "popt"})
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        assert result["skipped"] and "run_mechint_eval" not in result["reason"], result
        assert '"eval_inputs": {"input_ids"' in result["reason"]
        assert "--tokenizer" in result["reason"]
        assert "run_mechint_eval" in result["reason_python"]
    finally:
        mixin.close()
    without, mixin = make_client(None, store[1])
    try:
        assert without.get("/health").json()["model"] is False
        for kind in ("causal", "circuit"):
            r = without.post("/interpret", json={"analysis_type": kind, "layer_name": "popt"})
            reason = r.json()["result"]["reason"]
            assert "mechray serve --model" in reason and "EvalMechIntRunner" not in reason, reason
    finally:
        mixin.close()
