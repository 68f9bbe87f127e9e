"""The interpretation API on any FastAPI app: ``FastAPIIntegrationMixin(model, config)``.

Usage (the seed's Pattern 4)::

    from fastapi import FastAPI
    from mechray import FastAPIIntegrationMixin

    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config)    # model may be None; config or dict
    # saes={"l3": "results/saes/l3"}: SAEs clients may evaluate by name (params.pretrained)
    mixin.add_routes(app)                              # then: uvicorn app:app

    # curl http://localhost:8000/interpret/layers
    # curl -X POST http://localhost:8000/interpret -H "Content-Type: application/json" \
    #      -d '{"analysis_type": "neuron", "layer_name": "layer1"}'
    # curl -X POST http://localhost:8000/interpret/upload -F "file=@activations.pt" \
    #      -F "analysis_type=feature"

Routes: ``GET /interpret/layers``, ``GET /interpret/shards?offset=0&limit=1000`` (paged),
``POST /interpret``, ``POST /interpret/upload``, ``GET /interpret/jobs/{job_id}``, ``GET /health``
(never parses the manifest) and the dashboard
(``GET /interpret/dashboard``, and ``GET /`` when the app has no root route).  Long analyses
(``config.api_job_analyses``, or estimated over ``api_job_cost``) answer ``202`` with a job id.

The same :func:`add_routes` serves the Ray Serve ingress (:mod:`mechray.api.serve_app`); only the
*backend* differs: here :class:`LocalBackend` calls :class:`~mechray.api.service.Interpreter`
in a threadpool (off the event loop; through Ray tasks when Ray is initialised).

Safety, enforced per route before the body is read: bearer auth when ``$MECHRAY_API_TOKEN`` (see
``config.api_token_env``) is set (401, constant-time compare), a body cap from the
``Content-Length`` header and while streaming (413: ``api_max_upload_mb`` for uploads,
``api_max_json_kb`` otherwise).  Uploads are read and parsed at most ``api_max_concurrent`` at
a time (429 after 30 s of waiting), their headers checked before any tensor is built (see
:mod:`mechray.api.header`).  Every error is JSON ``{"error", "message", ...}``; a 5xx carries a
``request_id`` and never a traceback, path or pid (those go to the server log under that id).

A long-lived server should call ``gc.collect(); gc.freeze()`` once after start-up (Ray Serve
replicas do): otherwise an occasional full collection over torch's objects stalls every
in-flight request for ~100 ms (see benchmarks/README.md, "Serve latency").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from mechray.api.errors import ApiError
from mechray.api.request import Request as Work
from mechray.api.schema import (
    ErrorResponse,
    HealthResponse,
    InterpretRequest,
    InterpretResponse,
    JobAccepted,
    JobStatus,
    LayersResponse,
    ShardsResponse,
    UploadResponse,
)
from mechray.config import MechIntConfig

if TYPE_CHECKING:
    from mechray.api.service import Answer

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD = 64 * 1024
SHARDS_PAGE, MAX_SHARDS_PAGE = 1000, 10_000
_WHEN = {400: "malformed request body", 401: "missing or wrong bearer token",
         404: "unknown layer, job or store",
         413: "request body over the configured limit", 415: "upload format not accepted",
         422: "invalid request or parameters", 429: "too many jobs queued or uploads parsing",
         500: "a server bug (the body carries only a request id)",
         503: "the store cannot be read, or a shard of it is corrupt"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in _WHEN.items()}
_JSON = "application/json"


class FastAPIIntegrationMixin:
    """Adds mechray's interpretation routes to a FastAPI app (see the module docstring)."""

    def __init__(self, model: Any = None, config: Optional[MechIntConfig | dict] = None, *,
                 storage: Optional[str] = None, tokenizer: Any = None,
                 saes: Optional[dict[str, str]] = None):
        from mechray.api.jobs import JobBoard
        from mechray.api.service import Interpreter

        cfg = MechIntConfig.coerce(config) if config is not None else \
            MechIntConfig(sample_layers=["*"])
        self.config = cfg
        self.service = Interpreter(model, cfg, location=storage, tokenizer=tokenizer, saes=saes)
        self.jobs = JobBoard(self.service.compute_job, workers=cfg.api_job_workers,
                             max_pending=cfg.api_max_pending_jobs, ttl_s=cfg.api_job_ttl_s)

    def add_routes(self, app: FastAPI) -> FastAPI:
        """Add the routes to ``app`` (returns it)."""
        add_routes(app, LocalBackend(self.service, self.jobs), self.config)
        return app

    def close(self) -> None:
        """Stop the job workers and remove temporary upload stores."""
        self.jobs.close()
        self.service.close()


class LocalBackend:
    """The routes' backend in one process: the service in a threadpool, a thread job board."""

    def __init__(self, service, jobs):
        self.service, self.jobs = service, jobs

    async def layers(self) -> bytes:
        return await run_in_threadpool(self.service.layers_json)

    async def shards(self, offset: int, limit: int) -> bytes:
        return await run_in_threadpool(self.service.shards_json, offset, limit)

    async def health(self) -> dict[str, Any]:
        return {**await run_in_threadpool(self.service.health), "jobs_pending": self.jobs.pending()}

    async def interpret(self, work: Work) -> Answer:
        return await run_in_threadpool(self.service.interpret, work)

    async def submit(self, key: str, work: Work) -> dict[str, Any]:
        return self.jobs.submit(key, work, analysis=work.analysis, layer=work.layer)

    async def job(self, job_id: str) -> bytes:
        return self.jobs.status(job_id)


def add_routes(app: FastAPI, backend: Any, config: MechIntConfig, *, dashboard: bool = True
               ) -> None:
    """Install the API on ``app`` over ``backend`` (a :class:`LocalBackend` or Serve's)."""
    from mechray.api.uploads import parse_params
    from mechray.version import __version__

    router = APIRouter(route_class=_route_class(config), tags=["mechray"])
    parsing = ParseSlots(config.api_max_concurrent)
    bearer = [_bearer_doc()]

    @router.get("/interpret/layers", response_model=LayersResponse, responses=_ERRORS,
                dependencies=bearer, summary="Captured layers: shapes, shard and row counts")
    async def interpret_layers() -> Response:
        return Response(await backend.layers(), media_type=_JSON)

    @router.get("/interpret/shards", response_model=ShardsResponse, responses=_ERRORS,
                dependencies=bearer, summary="The store's shards (from its manifest), paged")
    async def interpret_shards(
            offset: int = Query(0, ge=0, le=10 ** 9, description="first shard of the page"),
            limit: int = Query(SHARDS_PAGE, ge=1, le=MAX_SHARDS_PAGE,
                               description="shards per page")) -> Response:
        return Response(await backend.shards(offset, limit), media_type=_JSON)

    @router.post("/interpret", response_model=InterpretResponse, dependencies=bearer,
                 responses={**_ERRORS, 202: {"model": JobAccepted, "description": "queued job"}},
                 summary="Run an analysis on a captured layer (202 + job id when long)")
    async def interpret(body: InterpretRequest, request: Request) -> Response:
        work = Work(body.analysis_type, body.layer_name, body.params or {},
                    eval_inputs=body.eval_inputs)        # the one typed request, built once
        return await _answer(backend, work, request)

    @router.post("/interpret/upload", response_model=UploadResponse, dependencies=bearer,
                 responses={**_ERRORS, 202: {"model": JobAccepted, "description": "queued job"}},
                 summary="Analyse uploaded activations (.pt, .safetensors, .npy, .npz)")
    async def interpret_upload(
            request: Request,
            file: UploadFile = File(..., description="a tensor or {layer: tensor}"),
            analysis_type: str = Form(..., min_length=1, max_length=64),
            params: Optional[str] = Form(None, max_length=65536,
                                         description="the analysis's parameters as JSON"),
            layer_name: Optional[str] = Form(None, max_length=256,
                                             description="analyse only this uploaded layer"),
    ) -> Response:
        spec = parse_params(params)
        async with parsing:
            upload = await run_in_threadpool(_read_upload, file)
        work = Work(analysis_type, layer_name or None, spec, upload=upload)
        return await _answer(backend, work, request)

    @router.get("/interpret/jobs/{job_id}", response_model=JobStatus, responses=_ERRORS,
                dependencies=bearer, name="mechray_job", summary="A job's status and result")
    async def interpret_job(job_id: str = Path(..., pattern=r"^[0-9a-f]{32}$")) -> Response:
        return Response(await backend.job(job_id), media_type=_JSON)

    taken = {(r.path, m) for r in app.routes if isinstance(r, APIRoute) for m in r.methods or ()}
    if ("/health", "GET") not in taken:
        @router.get("/health", response_model=HealthResponse, summary="Liveness and store state")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "version": __version__, **await backend.health()}
    if dashboard:
        from mechray.api.dashboard import page

        paths = ["/interpret/dashboard"] + ([] if ("/", "GET") in taken else ["/"])
        for path in paths:
            router.add_api_route(path, lambda: HTMLResponse(page()), methods=["GET"],
                                 response_class=HTMLResponse, summary="The dashboard page",
                                 name=f"mechray_dashboard{path.replace('/', '_')}")
    app.include_router(router)


def _read_upload(file: UploadFile):
    from mechray.api.uploads import parse_upload

    return parse_upload(file.file, file.filename)   # headers first: a refused upload is
                                                    # never read whole into memory


class ParseSlots:
    """At most ``n`` uploads read and parsed at once (their bodies wait spooled on disk); a
    request that waits over ``wait_s`` gets 429 with Retry-After.  Polled from the event loop,
    so waiting requests hold no threadpool thread."""

    def __init__(self, n: int, wait_s: float = 30.0):
        self._slots, self.wait_s = threading.BoundedSemaphore(n), wait_s

    async def __aenter__(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self._slots.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise ApiError(429, "too_many_uploads",
                               f"uploads are being parsed at the limit (api_max_concurrent) for "
                               f"over {self.wait_s:g} s; retry later",
                               headers={"Retry-After": "5"})
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: Any) -> None:
        self._slots.release()


async def _answer(backend: Any, work: Work, request: Request) -> Response:
    answer = await backend.interpret(work)
    if answer.result is not None:
        return Response(answer.body(), media_type=_JSON)
    accepted = await backend.submit(answer.job_key, work)
    accepted["poll"] = request.scope.get("root_path", "") + accepted["poll"]
    return JSONResponse(accepted, status_code=202, headers={"Location": accepted["poll"]})


# --- per-route safety: auth, body cap, JSON errors ----------------------------------------------
def _bearer_doc():
    from fastapi import Depends

    scheme = HTTPBearer(auto_error=False, description="$MECHRAY_API_TOKEN, when the server sets it")

    async def documented(_: Any = Depends(scheme)) -> None:   # the check runs in the route class
        return None
    return Depends(documented)


def _route_class(config: MechIntConfig) -> type[APIRoute]:
    json_cap = int(config.api_max_json_kb * 1024)
    upload_cap = int(config.api_max_upload_mb * 2 ** 20) + MULTIPART_OVERHEAD

    class MechrayRoute(APIRoute):
        def get_route_handler(self):
            original = super().get_route_handler()
            upload = self.path.endswith("/interpret/upload")
            cap, limit = (upload_cap, f"api_max_upload_mb={config.api_max_upload_mb:g} MB") \
                if upload else (json_cap, f"api_max_json_kb={config.api_max_json_kb:g} KB")
            protected = self.path.startswith("/interpret") and "dashboard" not in self.path

            async def handler(request: Request) -> Response:
                try:
                    if protected:
                        authorize(request, config.api_token_env)
                    _check_length(request, cap, limit)
                    capped = Request(request.scope, _capped(request.receive, cap, limit),
                                     request._send)
                    return await original(capped)
                except ApiError as exc:
                    return exc.response()
                except RequestValidationError as exc:
                    return invalid(exc).response()
                except HTTPException as exc:
                    message = str(exc.detail)
                    if isinstance(exc.__cause__, RecursionError):
                        return ApiError(422, "invalid_request", "the JSON body nests too deeply "
                                        "to parse; analysis parameters are a flat object such "
                                        "as {\"top_k\": 5}").response()
                    if exc.status_code == 400 and exc.__cause__ is not None:
                        cause = exc.__cause__
                        message += (f" ({type(cause).__name__}: {str(cause)[:200]}); send "
                                    + ("multipart/form-data with file and analysis_type"
                                       if upload else "UTF-8 JSON such as {\"analysis_type\": "
                                       "\"neuron\", \"layer_name\": \"popt\"}"))
                    return ApiError(exc.status_code, _CODES.get(exc.status_code, "http_error"),
                                    message, headers=dict(exc.headers or {}) or None).response()
                except Exception:  # a bug: JSON with a request id; the traceback is logged
                    return ApiError.internal(f"{request.method} {request.url.path}",
                                             log).response()
            return handler
    return MechrayRoute


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
          415: "unsupported_format", 422: "invalid_request", 429: "too_many_jobs"}


def authorize(request: Request, env_name: str) -> None:
    """401 unless the request carries the bearer token in ``$env_name`` (when that is set)."""
    token = os.environ.get(env_name)
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace"))
    if not ok:
        raise ApiError(401, "unauthorized", "missing or wrong bearer token: send the header "
                       f"'Authorization: Bearer <token>' with the token the server has in "
                       f"${env_name}", headers={"WWW-Authenticate": "Bearer"})


def _check_length(request: Request, cap: int, limit: str) -> None:
    length = request.headers.get("content-length")
    if length is None:
        return
    if not length.strip().isdigit():
        raise ApiError(400, "bad_request", f"Content-Length {length[:40]!r} is not a number")
    if int(length) > cap:
        raise ApiError(413, "too_large", f"the request body is {int(length):,} bytes, over "
                       f"{limit}; send less (or raise the limit in MechIntConfig)")


def _capped(receive, cap: int, limit: str):
    seen = 0

    async def capped_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise ApiError(413, "too_large", f"the request body is over {limit}; send less "
                               "(or raise the limit in MechIntConfig)")
        return message
    return capped_receive


def invalid(exc: RequestValidationError) -> ApiError:
    """A 422 naming every bad field (and, for unknown fields, the valid ones)."""
    errors, parts = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field; valid fields are {list(InterpretRequest.model_fields)}"
        elif isinstance(err.get("ctx"), dict) and err["ctx"].get("error"):
            msg = f"{msg} ({err['ctx']['error']})"
        errors.append({"loc": loc, "msg": msg, "type": str(err.get("type", ""))})
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return ApiError(422, "invalid_request", "invalid request: " + "; ".join(parts),
                    errors=errors)
