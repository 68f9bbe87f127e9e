"""The interpretation API as a Ray Serve application over a shard store, on 127.0.0.1.

Usage::

    python examples/serve_app.py                          # capture a tiny store, serve :8000
    python examples/serve_app.py --storage ./mechint_cache --port 8000
    python examples/serve_app.py --storage s3://bucket/exp001 \
        --s3-endpoint-url http://127.0.0.1:9000
    python examples/serve_app.py --smoke --port 0         # start, query, shut down (CI check)

    curl http://127.0.0.1:8000/interpret/layers
    curl -X POST http://127.0.0.1:8000/interpret -H "Content-Type: application/json" \\
         -d '{"analysis_type": "neuron", "layer_name": "popt"}'

What it does: without ``--storage`` it first captures a few steps of the demo model into
``{out}/mechint_cache`` (writer threads, no Ray).  Then it starts a local Ray (``address='local'``,
no dashboard; or joins ``$RAY_ADDRESS``), starts Serve on ``--host:--port`` and runs
``mechray.api.serve_app.build_app`` - the same application ``serve run deploy/serve_config.yaml`` and the
KubeRay RayService start: a FastAPI ingress, ``--replicas`` analysis replicas holding the store,
the model and a result cache, and a job board for long analyses (``sae`` answers 202 and a job id).

Auth: when ``$MECHRAY_API_TOKEN`` is set before Ray starts, the replicas inherit it and every
``/interpret*`` route wants ``Authorization: Bearer <token>``; ``--smoke`` sends it, and checks
that a request without it gets 401.

``--smoke`` queries ``GET /health``, ``GET /interpret/layers`` and ``POST /interpret`` (neuron)
with httpx, writes the answers to ``{out}/smoke.json``, then deletes the app and stops Ray;
without it the server runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("examples.serve_app")


def tiny_store(root: Path) -> str:
    """Capture three steps of the demo model into ``root`` (threads, no Ray); returns its path."""
    import torch

    from mechray import ActivationSampler
    from mechray.demo.model import NeuroFMX, spike_dataset

    torch.manual_seed(0)
    model = NeuroFMX(n_neurons=16, d_model=32, n_blocks=2).eval()
    spikes = spike_dataset(n_trials=24, n_neurons=16, seq_len=16).tensors[0]
    with ActivationSampler(layers=["mamba_backbone.blocks.1", "popt"], save_dir=str(root),
                           use_ray=False, verbose=False).attach(model) as sampler, \
            torch.no_grad():
        for step, batch in enumerate(spikes.split(8)):
            sampler.current_step = step
            model(batch)
            sampler.save_activations(step)
    return str(root)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def smoke(base: str, out: Path, timeout_s: float = 60.0) -> dict:
    """Query the running app with httpx; returns (and writes) what came back."""
    import httpx

    token = os.environ.get("MECHRAY_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answers: dict = {"base": base, "auth": bool(token)}
    with httpx.Client(base_url=base, timeout=60.0) as client:
        deadline = time.monotonic() + timeout_s
        while True:                                   # the proxy may need a moment after deploy
            try:
                r = client.get("/health")
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base}/health did not answer 200 within {timeout_s:.0f}s")
            time.sleep(0.5)
        answers["health"] = r.json()
        if token:
            answers["layers_without_token"] = client.get("/interpret/layers").status_code
        r = client.get("/interpret/layers", headers=headers)
        answers["layers"] = {"status": r.status_code, "body": r.json()}
        layer = sorted(r.json().get("layers", {}))[-1]
        r = client.post("/interpret", headers=headers,
                        json={"analysis_type": "neuron", "layer_name": layer,
                              "params": {"top_k": 3}})
        body = r.json()
        answers["interpret"] = {"status": r.status_code, "layer": layer,
                                "result_keys": sorted(body.get("result", {})),
                                "num_samples": body.get("result", {}).get("num_samples")}
    (out / "smoke.json").write_text(json.dumps(answers, indent=1))
    log.info("smoke: health %s, layers %s, POST /interpret %d", answers["health"]["status"],
             sorted(answers["layers"]["body"].get("layers", {})), answers["interpret"]["status"])
    return answers


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None,
                        help="store directory or s3://bucket/prefix (default: capture a tiny one)")
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--out", default="serve_app_output")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--replicas", type=int, default=1, help="analysis replicas")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--smoke", action="store_true", help="start, query, shut down")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or tiny_store(out / "mechint_cache")
    port = args.port or free_port(args.host)

    import ray
    from ray import serve

    from mechray.api.serve_app import run_server

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):             # a running cluster
            ray.init(configure_logging=False)
        else:
            ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    app_args = {"storage": storage, "num_replicas": args.replicas, "max_ongoing_requests": 8,
                "analysis_num_cpus": 1.0}
    if args.s3_endpoint_url:
        app_args["s3_endpoint_url"] = args.s3_endpoint_url
    base = f"http://{args.host}:{port}"
    try:
        run_server(app_args, host=args.host, port=port, blocking=not args.smoke)
        if args.smoke:
            return smoke(base, out)
        return None
    finally:
        if args.smoke:
            serve.shutdown()                          # deletes the app and the proxies
            ray.shutdown()


if __name__ == "__main__":
    main()
