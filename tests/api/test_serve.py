"""The Ray Serve application over real HTTP (httpx against 127.0.0.1): layers, analyses, uploads,
an SAE job polled to completion, 50 concurrent requests, auth, errors; the mixin fanning out as
Ray tasks; build_app's arguments, the deploy/ Serve config and the `mechray serve` command.

One real local Ray (the ``ray_local`` fixture) and one Serve instance on a free port for the
module; the analysis deployment holds the demo NeuroFMX model, so causal runs over HTTP too."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_hostile_api import alloc_bomb, memo_bomb

from mechray import ActivationSampler, FastAPIIntegrationMixin, MechIntConfig
from mechray.analysis.engine import Engine
from mechray.testing import free_port

LAYER, LAYERS = "mamba_backbone.blocks.1", ["mamba_backbone.blocks.1", "popt"]
MODEL = "mechray.demo.model:NeuroFMX"
TOKEN = "serve-test-token"
SMALL_SAE = {"expansion_factor": 2, "k": 8, "epochs": 2, "batch_size": 64}


def capture_demo(path: Path, steps=(0, 1, 2)) -> Path:
    """NeuroFMX activations (inputs saved) and its state_dict, as a training run leaves them."""
    from mechray.demo.model import NeuroFMX

    torch.manual_seed(0)
    model = NeuroFMX().eval()
    sampler = ActivationSampler(layers=LAYERS, save_dir=str(path), use_ray=False, verbose=False,
                                save_inputs=True)
    sampler.register_hooks(model)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        sampler.current_step = step
        with torch.no_grad():
            model(torch.poisson(torch.full((4, 16, 32), 2.0), generator=g))
        sampler.save_activations(step)
    sampler.close()
    torch.save(model.state_dict(), path.parent / "model.pt")
    return path.parent / "model.pt"


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """The application on 127.0.0.1:<free port> (open at /, token-protected at /secure)."""
    from ray import serve

    from mechray.api.serve_app import build

    store = tmp_path_factory.mktemp("serve") / "store"
    checkpoint = capture_demo(store)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"storage": str(store), "model": MODEL, "model_checkpoint": str(checkpoint),
            "max_ongoing_requests": 32, "analysis_num_cpus": 0.5,
            "config": {"api_max_upload_mb": 1}}
    secure = build({"storage": str(store), "analysis_num_cpus": 0},
                   ingress_options={"ray_actor_options": {
                       "num_cpus": 0, "runtime_env": {"env_vars": {"MECHRAY_API_TOKEN": TOKEN}}}})
    serve.run_many([serve.RunTarget(build(args), name="mechray", route_prefix="/"),
                    serve.RunTarget(secure, name="mechray-secure", route_prefix="/secure")])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, store
    serve.shutdown()


def poll(client, path, timeout=90.0, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(path, headers=headers).json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} did not finish in {timeout} s")


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_layers_and_a_neuron_analysis_over_http(served):
    client, store = served
    layers = client.get("/interpret/layers").json()
    assert sorted(layers["layers"]) == sorted(LAYERS)
    assert layers["layers"][LAYER]["feature_shape"] == [64]
    assert layers["layers"][LAYER]["rows"] == 3 * 4 * 16 and layers["layers"][LAYER]["shards"] == 3
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": LAYER})
    assert r.status_code == 200, r.text
    direct = Engine(str(store), use_ray=False, progress=False).run(["neuron"], layers=[LAYER])
    assert r.json()["result"]["std"] == pytest.approx(direct["neuron"][LAYER]["std"], rel=1e-12)
    again = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": LAYER})
    assert again.json()["cached"] is True
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["store_ready"] is True


def test_the_model_in_the_analysis_deployment_runs_causal(served):
    client, _ = served
    r = client.post("/interpret", json={"analysis_type": "causal", "layer_name": LAYER,
                                        "params": {"top_n": 8}})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert not result.get("skipped"), result
    effects = [e["effect"] for e in result["ranked"]]
    assert len(effects) == 8 and effects == sorted(effects, reverse=True)


def test_an_sae_job_polled_to_completion(served):
    client, _ = served
    r = client.post("/interpret", json={"analysis_type": "sae", "layer_name": LAYER,
                                        "params": SMALL_SAE})
    assert r.status_code == 202, r.text
    done = poll(client, r.headers["location"])
    assert done["status"] == "done", done
    result = done["result"]["result"]
    assert result["n_latents"] == 128 and 0 < result["l0"] <= 8


def test_uploads_over_http(served, tmp_path):
    client, _ = served
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(1))
    r = client.post("/interpret/upload", files={"file": ("x.pt", pt_bytes({"acts": x}))},
                    data={"analysis_type": "neuron"})
    assert r.status_code == 200, r.text
    assert r.json()["results"]["acts"]["mean"] == pytest.approx(x.double().mean(0).tolist())

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    r = client.post("/interpret/upload", files={"file": ("x.pt", pt_bytes({"a": Evil()}))},
                    data={"analysis_type": "neuron"})
    assert r.status_code == 422 and r.json()["error"] == "unreadable_upload"
    assert not (tmp_path / "pwned").exists()
    big = pt_bytes(torch.zeros(600_000))                     # 2.4 MB > api_max_upload_mb=1
    r = client.post("/interpret/upload", files={"file": ("big.pt", big)},
                    data={"analysis_type": "neuron"})
    assert r.status_code == 413 and "api_max_upload_mb" in r.json()["message"]


def test_hostile_inputs_over_serve_are_4xx_before_reaching_a_replica(served):
    """float8 (a 500 carrying a RayTaskError before), sparse, quantized, expanded views, a 1-D
    upload with a huge answer, ``bytearray(2**30)`` pickles (951 bytes, and beside 48 MB of
    storage), a 2**26 memo index, deep and out-of-range params: 4xx from the ingress (the memo
    one a 200), naming what is supported, the ingress replicas' peak RSS (VmHWM) growing
    < 50 MB over all but the 48 MB upload (see below); shards paged."""
    client, _ = served
    ingress = _processes_named("MechrayIngress")
    assert ingress, "no ingress replica process found under this test's Ray"
    before = {pid: _peak_rss(pid) for pid in ingress}
    quantized = torch.quantize_per_tensor(torch.rand(4, 3), 0.1, 0, torch.quint8)
    for obj, code in [(torch.zeros(4, 3).to(torch.float8_e4m3fn), "unsupported_dtype"),
                      (torch.eye(3).to_sparse(), "unsupported_layout"),
                      (quantized, "unsupported_layout"),
                      (torch.zeros(1).expand(100_000, 10_000), "expanded_upload")]:
        r = client.post("/interpret/upload", files={"file": ("x.pt", pt_bytes(obj))},
                        data={"analysis_type": "neuron"})
        assert r.status_code == 422 and r.json()["error"] == code, r.text
        assert "Traceback" not in r.text and "site-packages" not in r.text
    r = client.post("/secure/interpret/upload", headers={"Authorization": f"Bearer {TOKEN}"},
                    files={"file": ("x.pt", pt_bytes(torch.randn(10 ** 6)))},   # 4 MB: the
                    data={"analysis_type": "neuron"})            # app at /secure allows 64 MB
    assert r.status_code == 422 and r.json()["error"] == "too_expensive", r.text
    # issue 19 defect 1: +950 MB before
    first = {"before bombs": max(_peak_rss(pid) - before[pid] for pid in ingress)}

    for _ in range(2):
        r = client.post("/interpret/upload", files={"file": ("x.pt", alloc_bomb(2 ** 30))},
                        data={"analysis_type": "neuron"})
        assert r.status_code == 422 and "bytearray(int)" in r.json()["message"], r.text
    steps = {**first, "small bombs": max(_peak_rss(pid) - before[pid] for pid in ingress)}
    r = client.post("/secure/interpret/upload", headers={"Authorization": f"Bearer {TOKEN}"},
                    files={"file": ("x.pt", alloc_bomb(2 ** 30, {"x": torch.zeros(12 << 20)}))},
                    data={"analysis_type": "neuron"})              # 48 MB: the largest refused
    assert r.status_code == 422 and "bytearray(int)" in r.json()["message"], r.text
    steps["48 MB bomb"] = max(_peak_rss(pid) - before[pid] for pid in ingress)
    r = client.post("/interpret/upload", files={"file": ("x.pt", memo_bomb(2 ** 26))},
                    data={"analysis_type": "neuron"})
    assert r.status_code == 200, r.text                           # valid, and read cheaply
    grown = max(_peak_rss(pid) - before[pid] for pid in ingress)
    shown = {k: round(v / 2 ** 20) for k, v in steps.items()}
    assert steps["small bombs"] < 50 * 2 ** 20, f"an ingress replica's peak RSS grew {shown}"
    # Serve's Python proxy (this fixture's) hands the ingress replica a request's whole body at
    # once, so a 48 MB upload costs about its size there, bomb or not; behind HAProxy (`mechray
    # serve`'s default) the body streams to disk as with the mixin (test_serve_fast_path.py)
    assert grown < 50 * 2 ** 20 + 2 * (48 << 20), f"an ingress replica's peak RSS grew {shown}"
    r = client.post("/interpret/upload", files={"file": ("x.pt", pt_bytes(torch.ones(4, 3)))},
                    data={"analysis_type": "neuron", "params": "[" * 10_000 + "]" * 10_000})
    assert r.status_code == 422 and r.json()["error"] == "bad_params", r.text
    r = client.post("/interpret", json={"analysis_type": "feature", "layer_name": LAYER,
                                        "params": {"seed": 10 ** 30}})
    assert r.status_code == 422 and "seed" in r.json()["message"], r.text
    page = client.get("/interpret/shards", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and len(page["shards"]) == 1 and page["next_offset"] == 2


def _processes_named(word: str) -> list[int]:
    """Pids of this process's descendants (this test's Ray) whose command line holds ``word``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                if word in Path(f"/proc/{pid}/cmdline").read_text():
                    found.append(pid)
            except OSError:
                pass
    return found


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_errors_over_http_name_the_problem(served):
    client, _ = served
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt2"})
    assert r.status_code == 404 and r.json()["valid"] == sorted(LAYERS)
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "../x"})
    assert r.status_code == 422 and r.json()["error"] == "path_like_layer_name"
    r = client.post("/interpret", json={"analysis_type": "circuit", "layer_name": LAYER,
                                        "params": {"metric": "loss", "loss_fn": "os:system"}})
    assert r.status_code == 422 and r.json()["error"] == "code_param_refused"
    r = client.get("/interpret/jobs/" + "f" * 32)
    assert r.status_code == 404 and r.json()["error"] == "unknown_job"


def test_fifty_concurrent_requests_all_succeed(served):
    client, _ = served
    base = str(client.base_url)
    requests = [("GET", "/interpret/layers", None), ("GET", "/health", None),
                ("GET", "/interpret/shards", None)] + \
        [("POST", "/interpret", {"analysis_type": a, "layer_name": la})
         for a in ("neuron", "feature", "dynamics") for la in LAYERS]

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as ac:
            calls = [ac.request(m, p, json=b) for m, p, b in (requests * 6)[:50]]
            return await asyncio.gather(*calls)
    responses = asyncio.run(run())
    assert len(responses) == 50
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses
                                                              if r.status_code != 200]
    means = {r.json()["result"]["mean"][0] for r in responses
             if r.request.method == "POST" and b'"neuron"' in r.request.content
             and LAYER.encode() in r.request.content}
    assert len(means) == 1                        # identical answers, computed once or cached


def test_auth_on_over_http(served):
    client, _ = served
    r = client.get("/secure/interpret/layers")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    bad = client.get("/secure/interpret/layers", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/secure/interpret/layers", headers=good).status_code == 200
    r = client.post("/secure/interpret", headers=good,
                    json={"analysis_type": "sae", "layer_name": "popt", "params": SMALL_SAE})
    assert r.status_code == 202 and r.headers["location"].startswith("/secure/interpret/jobs/")
    assert client.get(r.headers["location"]).status_code == 401
    assert poll(client, r.headers["location"], headers=good)["status"] == "done"
    assert client.get("/secure/health").status_code == 200
    assert client.get("/interpret/layers").status_code == 200        # the open app: auth off


def test_the_mixin_fans_out_as_ray_tasks_when_ray_is_up(served):
    _, store = served
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(None, MechIntConfig(sample_layers=["*"],
                                                        storage_path=str(store), verbose=False))
    mixin.add_routes(app)
    client = TestClient(app)
    assert client.get("/health").json()["ray"] is True
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt"})
    direct = Engine(str(store), use_ray=False, progress=False).run(["neuron"], layers=["popt"])
    assert r.json()["result"]["mean"] == pytest.approx(direct["neuron"]["popt"]["mean"], rel=1e-12)
    mixin.close()


# --- building the application (no Serve needed) ------------------------------------------------
def test_build_app_validates_its_args(tmp_path):
    from mechray.api.serve_app import build_app

    with pytest.raises(ValueError, match="storge.*Valid args.*storage"):
        build_app({"storge": "x"})
    with pytest.raises(ValueError, match="model_checkpoint needs model"):
        build_app({"storage": "x", "model_checkpoint": "m.pt"})
    with pytest.raises(ValueError, match="api_max_upload_mb"):
        build_app({"storage": "x", "config": {"api_max_upload_mb": -1}})
    app = build_app({"storage": str(tmp_path), "num_replicas": 2, "max_ongoing_requests": 4})
    assert type(app).__name__ == "Application"
    scaled = build_app({"storage": str(tmp_path), "autoscaling_config": {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}})
    analysis = scaled._bound_deployment.init_args[0]._bound_deployment      # ingress(analysis, ..)
    assert analysis.name == "MechrayAnalysis"
    assert analysis._deployment_config.autoscaling_config.max_replicas == 4


def test_the_deploy_serve_config_builds():
    path = Path(__file__).parents[2] / "deploy" / "serve_config.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is not there yet")
    doc = yaml.safe_load(path.read_text())
    app = next(a for a in doc["applications"] if a["import_path"] == "mechray.serve:build_app")
    from mechray.api.serve_app import build_app

    assert type(build_app(app["args"])).__name__ == "Application"


def test_every_deployment_file_starts_ray_with_the_haproxy_ingress():
    """The proxy is read from the environment when a Ray node starts: the image, the RayService
    containers and the cluster launcher's `ray start` all set it; serve_config.yaml says so."""
    deploy = Path(__file__).parents[2] / "deploy"
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in (deploy / "Dockerfile").read_text()
    doc = yaml.safe_load((deploy / "kuberay" / "rayservice.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", container["name"]
    launcher = yaml.safe_load((deploy / "cluster" / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in launcher[key] if "ray start" in c)
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in start
    assert "export RAY_SERVE_ENABLE_HA_PROXY=1" in (deploy / "serve_config.yaml").read_text()


def test_the_model_loads_from_a_checkpoint(tmp_path):
    from mechray.api.serve_app import _load_model
    from mechray.demo.model import NeuroFMX

    torch.manual_seed(3)
    torch.save(NeuroFMX().state_dict(), tmp_path / "m.pt")
    model = _load_model(MODEL, str(tmp_path / "m.pt"))
    assert torch.equal(model.embed.weight, torch.load(tmp_path / "m.pt",
                                                      weights_only=True)["embed.weight"])


def test_mechray_serve_command(monkeypatch):
    from mechray import cli
    from mechray.api import serve_app as serve

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda args, **kw: seen.update(args=args, **kw))
    assert cli.main(["serve", "--storage", "s3://b/p", "--endpoint-url", "http://127.0.0.1:9",
                     "--port", "8123", "--num-replicas", "2"]) == 0
    assert seen["args"]["storage"] == "s3://b/p" and seen["args"]["num_replicas"] == 2
    assert seen["args"]["s3_endpoint_url"] == "http://127.0.0.1:9"
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["proxy"] == "haproxy"                           # the fast path by default
    assert cli.main(["serve", "--storage", "./s", "--proxy", "python"]) == 0
    assert seen["proxy"] == "python"
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")        # the user's own opt-out
    assert cli.main(["serve", "--storage", "./s"]) == 0
    assert seen["proxy"] == "python"


def test_mechray_serve_takes_named_saes_and_refuses_a_bad_one_before_starting(monkeypatch,
                                                                               tmp_path, capsys):
    """Issue 19 defect 4: ``--sae NAME=DIR`` is the only way an SAE reaches HTTP clients;
    a bad one stops the command with its name and the fix, before Ray starts."""
    from mechray import cli
    from mechray.analysis.sae.model import SparseAutoencoder, save_saelens
    from mechray.api import serve_app as serve
    from mechray.errors import ConfigError

    save_saelens(SparseAutoencoder(64, 128, "topk", 8), tmp_path / "l1", hook_name=LAYER)
    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda args, **kw: seen.update(args=args, **kw))
    assert cli.main(["serve", "--storage", "./s", "--sae", f"l1={tmp_path / 'l1'}"]) == 0
    assert seen["args"]["saes"] == {"l1": str(tmp_path / "l1")}
    app = serve.build_app({"storage": "./s", "saes": seen["args"]["saes"]})
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="'gone'.*SAELens directory"):
        serve.build_app({"storage": "./s", "saes": {"gone": str(tmp_path / "gone")}})
    assert cli.main(["serve", "--storage", "./s", "--sae", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_haproxy_env_keeps_the_users_settings_and_falls_back_without_a_binary(tmp_path, caplog):
    from mechray.api.serve_app import HA_PROXY, haproxy_env

    env = haproxy_env({"RAY_SERVE_HAPROXY_STATS_PORT": "18404"})
    assert env[HA_PROXY] == "1" and "RAY_SERVE_HAPROXY_STATS_PORT" not in env
    ports = [int(env[k]) for k in ("RAY_SERVE_HAPROXY_METRICS_PORT",
                                   "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")]
    assert all(1024 < p < 65536 for p in ports) and ports[0] != ports[1]
    # a binary that is not there: Serve's Python proxy, said in the log (not a crash at start)
    missing = tmp_path / "no-haproxy"
    assert haproxy_env({"RAY_SERVE_HAPROXY_BINARY_PATH": str(missing)}) == {HA_PROXY: "0"}
    assert "no HAProxy binary" in caplog.text
