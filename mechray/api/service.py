"""The interpretation service behind every route: validation, cost, cache, and the analysis engine.

Usage::

    from mechray.api.service import Interpreter

    service = Interpreter(model, config)                        # store: config.storage_path or S3
    service.layers_json()                                       # bytes of LayersResponse
    status, value = service.interpret({"analysis_type": "neuron", "layer_name": "popt"})
    # ("done", response bytes) | ("job", key): long requests go to the JobBoard, which calls
    service.compute(request)                                    # the response bytes (cached)

Plain synchronous Python (no web framework), so the FastAPI mixin calls it from a threadpool and
the Ray Serve analysis deployment calls it in its replicas: the routes and the analyses are the
same code either way.  Analyses run through :class:`mechray.analysis.engine.Engine`, fanned out as
Ray tasks when Ray is initialised (``config.use_ray=None``) and in-process otherwise; uploads
always run in-process on a private temporary store.

Results are cached (LRU, ``config.api_cache_entries``) by (analysis, layer, full validated
params, manifest version): the version is a hash of the manifest's (file, checksum) pairs, re-read
when a local store's directory or manifest changes and at least every ``api_manifest_ttl_s``,
so a new shard invalidates every cached result.  Identical requests in flight compute once.
Every bad input raises :class:`~mechray.api.errors.ApiError` (4xx) naming the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch

from mechray.analysis.base import REGISTRY, AnalysisParamsError, get_analysis
from mechray.api.cost import Cost, Workload, estimate
from mechray.api.errors import ApiError
from mechray.api.uploads import Upload, check_layer_name
from mechray.config import MechIntConfig
from mechray.storage.reader import ShardError, ShardStore

log = logging.getLogger(__name__)
CODE_PARAMS = ("loss_fn",)          # parameters that import code: refused over HTTP
KEEP_UPLOAD_STORES = 8


class Interpreter:
    """One store (and optionally a model) served to many concurrent requests."""

    def __init__(self, model: Optional[torch.nn.Module], config: MechIntConfig | dict, *,
                 location: Optional[str] = None):
        from mechray.analysis.runner import default_location

        self.config = cfg = MechIntConfig.coerce(config)
        self.model = model.eval() if model is not None else None
        self.location = str(location or default_location(cfg))
        self.model_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self._store: Optional[ShardStore] = None
        self._version, self._stamp, self._checked = "", None, 0.0
        self._layers: dict[str, dict[str, Any]] = {}   # store.layers() + shard_rows, per version
        self._store_lock, self._lock = threading.Lock(), threading.Lock()
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(cfg.api_max_concurrent)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._flights: dict[str, Future] = {}
        self._pages: dict[str, tuple[str, bytes]] = {}
        self._upload_dir: Optional[Path] = None             # created on the first upload
        self._upload_stores: OrderedDict[str, ShardStore] = OrderedDict()

    # --- the store -----------------------------------------------------------------------------
    def snapshot(self) -> tuple[ShardStore, str]:
        """The store and its manifest version, re-read when it changed (404 if there is none)."""
        with self._store_lock:
            now = time.monotonic()
            stamp = self._local_stamp()
            if self._store is None:
                try:
                    self._store = ShardStore(self.location, endpoint_url=self.config.endpoint_url,
                                             region=self.config.s3_region)
                except FileNotFoundError as exc:
                    raise ApiError(404, "no_store", str(exc)) from None
                except Exception as exc:  # e.g. S3 unreachable: the server's problem, not input
                    raise ApiError(503, "store_unreadable", f"the store {self.location} cannot "
                                   f"be read: {type(exc).__name__}: {exc}") from None
            elif stamp != self._stamp or now - self._checked >= self.config.api_manifest_ttl_s:
                try:
                    self._store.refresh()
                except Exception as exc:  # keep serving the last good manifest
                    log.warning("mechray: re-reading the manifest of %s failed (%s); serving "
                                "the previous one", self.location, exc)
            else:
                return self._store, self._version
            self._stamp, self._checked = stamp, now
            version = manifest_version(self._store.manifest)
            if version != self._version:
                self._layers = self._store.layers()
                for name, info in self._layers.items():
                    info["shard_rows"] = max(
                        (e["rows"].get(name, 0) for e in self._store.shards(name)
                         if isinstance(e.get("rows"), dict)), default=0) or info["rows"]
                self._version = version
            return self._store, self._version

    def _local_stamp(self) -> Optional[tuple]:
        if self.location.startswith("s3://"):
            return None
        root = Path(self.location).expanduser()
        try:
            d, m = root.stat(), (root / "manifest.json").stat()
        except OSError:
            return None
        return (d.st_mtime_ns, m.st_mtime_ns, m.st_size, m.st_ino)

    def layers_json(self) -> bytes:
        keys = ("feature_shape", "dtype", "shards", "rows", "steps")
        return self._page("layers", lambda store, version: {
            "store": store.location, "manifest_version": version,
            "layers": {name: {k: info[k] for k in keys} for name, info in self._layers.items()}})

    def shards_json(self) -> bytes:
        keys = ("file", "step", "steps", "rank", "rows", "bytes", "s3_uri")
        return self._page("shards", lambda store, version: {
            "store": store.location, "manifest_version": version,
            "shards": [{k: e.get(k) for k in keys} | {"steps": e.get("steps", [e["step"]])}
                       for e in store.shards()]})

    def _page(self, name: str, build) -> bytes:
        store, version = self.snapshot()
        hit = self._pages.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        body = json.dumps(build(store, version)).encode()
        self._pages[name] = (version, body)
        return body

    def health(self) -> dict[str, Any]:
        try:
            self.snapshot()
            ready = True
        except ApiError:
            ready = False
        return {"store_ready": ready, "ray": self._use_ray()}

    # --- requests ------------------------------------------------------------------------------
    def interpret(self, request: dict) -> tuple[str, Any]:
        """``("done", bytes)`` answered now (cache or a short analysis), or ``("job", key)``."""
        work, body = self.lookup(request)
        if body is not None:
            return "done", body
        if work["analysis"] in self.config.api_job_analyses or \
                work["cost"].ops > self.config.api_job_cost:
            return "job", work["key"]
        return "done", self._compute(work)

    def lookup(self, request: dict) -> tuple[dict[str, Any], Optional[bytes]]:
        """Validate ``request`` (4xx if bad) and return its plan and cached response, if any."""
        work = self.plan(request)
        body = self._cached(work["key"])
        return work, None if body is None else _mark_cached(body)

    def remember(self, work: dict[str, Any], body: bytes) -> None:
        """Cache a response computed elsewhere (a Serve analysis replica) under ``work``'s key,
        unless it was computed on another manifest version than the key's."""
        if work["upload"] is None and f'"manifest_version": "{work["source"]}"'.encode() \
                not in body[:4096]:
            return
        self._store_result(work["key"], body)

    def compute(self, request: dict) -> bytes:
        """The response for ``request`` (validated again), computed or from the cache."""
        work = self.plan(request)
        body = self._cached(work["key"])
        return _mark_cached(body) if body is not None else self._compute(work)

    def plan(self, request: dict) -> dict[str, Any]:
        """Validate a request; returns what to run, its cost and its cache key (4xx if bad)."""
        analysis, upload = request["analysis_type"], request.get("upload")
        params = request.get("params") or {}
        spec = self._params(analysis, params)
        layer = request.get("layer_name")
        if upload is not None:
            source = f"upload:{upload.sha256}"
            layers = self._upload_layers(upload, layer)
            work = [Workload(len(upload.tensors[la]), upload.tensors[la].shape[1],
                             len(upload.tensors[la])) for la in layers]
        else:
            info, source = self._store_layer(layer)
            d = 1
            for s in info["feature_shape"]:
                d *= s
            work = [Workload(info["rows"], d, info["shard_rows"], len(info["steps"]),
                             self.model_params, len(self._layers), self.config.eval_max_samples)]
            layers = [layer]
        costs = [estimate(analysis, spec, w) for w in work]
        cost = Cost(sum(c.ops for c in costs), max(c.bytes for c in costs))
        self._check_cost(analysis, cost)
        key = hashlib.sha256(json.dumps([analysis, layers, spec, source],
                                        sort_keys=True).encode()).hexdigest()
        return {"analysis": analysis, "params": spec, "layers": layers, "layer": layer,
                "upload": upload, "source": source, "cost": cost, "key": key}

    def _params(self, analysis: str, params: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise ApiError(422, "bad_params", f"params must be a JSON object, got "
                           f"{type(params).__name__}")
        for name in CODE_PARAMS:
            if params.get(name) is not None:
                raise ApiError(422, "code_param_refused",
                               f"params.{name}={str(params[name])[:80]!r} would import and run "
                               "code on the server, which the HTTP API never does; use "
                               "metric='mse' or 'kl', or run `mechray analyze` / "
                               "EvalMechIntRunner locally with your loss function")
        if params.get("metric") == "loss":
            raise ApiError(422, "code_param_refused", "metric='loss' needs a loss_fn, which the "
                           "HTTP API never imports; use metric='mse' or 'kl'")
        try:
            return get_analysis(analysis, params).params.model_dump(mode="json")
        except KeyError as exc:
            raise ApiError(422, "unknown_analysis", str(exc.args[0]),
                           valid=sorted(REGISTRY)) from None
        except AnalysisParamsError as exc:
            raise ApiError(422, "bad_params", str(exc)) from None

    def _store_layer(self, layer: Optional[str]) -> tuple[dict[str, Any], str]:
        """The layer's catalog entry and the manifest version (404 naming the valid layers)."""
        if layer is None:
            raise ApiError(422, "missing_layer_name", "layer_name is required; GET "
                           "/interpret/layers lists the captured layers")
        check_layer_name(layer)
        store, version = self.snapshot()
        info = self._layers.get(layer)
        if info is None:
            try:
                store.check_layer(layer)        # its message names close matches
                message = f"layer {layer!r} is not in {store.location}"
            except KeyError as exc:
                message = str(exc.args[0])
            raise ApiError(404, "unknown_layer", message, valid=sorted(self._layers))
        return info, version

    def _upload_layers(self, upload: Upload, layer: Optional[str]) -> list[str]:
        if layer is None:
            return list(upload.tensors)
        check_layer_name(layer)
        if layer not in upload.tensors:
            raise ApiError(404, "unknown_layer", f"layer {layer!r} is not in the uploaded file; "
                           f"it holds {sorted(upload.tensors)}", valid=sorted(upload.tensors))
        return [layer]

    def _check_cost(self, analysis: str, cost) -> None:
        cfg = self.config
        if cost.bytes > cfg.api_max_memory_mb * 2 ** 20:
            raise ApiError(422, "too_expensive",
                           f"{analysis} with these params needs about {cost.bytes / 2 ** 20:,.0f} "
                           f"MiB, over api_max_memory_mb={cfg.api_max_memory_mb:g}; lower the "
                           "sizes in params (latents, components, rows) or run `mechray analyze`")
        if cost.ops > cfg.api_max_cost:
            raise ApiError(422, "too_expensive",
                           f"{analysis} with these params needs about {cost.ops:.2g} operations, "
                           f"over api_max_cost={cfg.api_max_cost:.2g}; lower epochs/steps/rows "
                           "in params or run `mechray analyze` offline")

    # --- computing -----------------------------------------------------------------------------
    def _cached(self, key: str) -> Optional[bytes]:
        with self._lock:
            body = self._cache.get(key)
            if body is not None:
                self._cache.move_to_end(key)
            return body

    def _compute(self, work: dict[str, Any]) -> bytes:
        key = work["key"]
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Future()
        if not leader:
            return _mark_cached(flight.result())
        try:
            body = self._run(work)
            self._store_result(key, body)
            flight.set_result(body)
            return body
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)

    def _store_result(self, key: str, body: bytes) -> None:
        with self._lock:
            if self.config.api_cache_entries:
                self._cache[key] = body
                self._cache.move_to_end(key)
                while len(self._cache) > self.config.api_cache_entries:
                    self._cache.popitem(last=False)

    def _run(self, work: dict[str, Any]) -> bytes:
        from mechray.analysis.engine import Engine
        from mechray.analysis.runner import json_safe

        name, upload = work["analysis"], work["upload"]
        with self._slots:
            t0 = time.perf_counter()
            if upload is not None:
                store, use_ray = self._upload_store(upload), False
            else:
                store, use_ray = self.snapshot()[0], self.config.use_ray
            model_lock = self._model_lock if get_analysis(name).kind == "model" else \
                contextlib.nullcontext()
            try:
                engine = Engine(store, use_ray=use_ray, progress=False,
                                num_cpus=self.config.analysis_num_cpus,
                                seed=self.config.sample_seed)
                with model_lock:
                    results = engine.run([name], {name: work["params"]}, layers=work["layers"],
                                         model=self.model)
            except ShardError as exc:
                raise ApiError(500, "store_error", f"the store could not be read: {exc}") from None
            seconds = round(time.perf_counter() - t0, 4)
        per_layer = json_safe(results[name])
        if upload is not None:
            doc = {"analysis_type": name, "params": work["params"],
                   "upload": {"sha256": upload.sha256, "format": upload.kind,
                              "layers": upload.shapes()},
                   "results": {la: per_layer[la] for la in work["layers"]},
                   "seconds": seconds, "cached": False}
        else:
            doc = {"analysis_type": name, "layer_name": work["layer"], "params": work["params"],
                   "manifest_version": work["source"], "result": per_layer[work["layer"]],
                   "seconds": seconds, "cached": False}
        return json.dumps(doc, allow_nan=False).encode()

    def _upload_store(self, upload: Upload) -> ShardStore:
        """A private one-shard store holding the upload (kept for the last few uploads)."""
        with self._lock:
            store = self._upload_stores.get(upload.sha256)
            if store is not None:
                self._upload_stores.move_to_end(upload.sha256)
                return store
        from mechray.storage.manifest import Manifest
        from mechray.storage.shard import Chunk, PendingShard, shard_name
        from mechray.storage.sink import ShardSink, StorageTarget

        with self._lock:
            if self._upload_dir is None:
                self._upload_dir = Path(tempfile.mkdtemp(prefix="mechray-uploads-"))
                weakref.finalize(self, shutil.rmtree, self._upload_dir, ignore_errors=True)
        root = self._upload_dir / upload.sha256
        target = StorageTarget(backend="local", local_dir=str(root))
        payload = PendingShard(
            name=shard_name(0, 0), index=0, step=0, rank=0, world_size=1,
            max_rows=max(len(t) for t in upload.tensors.values()),
            chunks={la: [Chunk(rows=t, step=0, positions=None)]
                    for la, t in upload.tensors.items()},
            layer_info={}).materialize()
        Manifest(target, {"source": "upload"}).add(ShardSink(target).write(payload))
        store = ShardStore(str(root))
        with self._lock:
            self._upload_stores[upload.sha256] = store
            while len(self._upload_stores) > KEEP_UPLOAD_STORES:
                old, _ = self._upload_stores.popitem(last=False)
                shutil.rmtree(self._upload_dir / old, ignore_errors=True)
        return store

    def _use_ray(self) -> bool:
        if self.config.use_ray is not None:
            return self.config.use_ray
        try:
            import ray
        except ImportError:
            return False
        return ray.is_initialized()

    def close(self) -> None:
        """Remove the temporary stores of uploads."""
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)


def manifest_version(manifest: dict[str, Any]) -> str:
    """A short hash of the manifest's (file, checksum) pairs: any new or changed shard moves it."""
    pairs = sorted((e["file"], e["checksum"]) for e in manifest.get("shards", []))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def _mark_cached(body: bytes) -> bytes:
    """The same response with ``"cached": true`` (responses end with ``"cached": false}``)."""
    tail = b'"cached": false}'
    return body[: -len(tail)] + b'"cached": true}' if body.endswith(tail) else body
