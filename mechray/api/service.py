"""The interpretation service behind every route: a facade over the view, planner, cache and runs.

Usage::

    from mechray.api.service import Interpreter

    service = Interpreter(model, config)                  # store: config.storage_path or S3
    service.layers_json()                                 # bytes of LayersResponse
    answer = service.interpret(Request("neuron", "popt"))  # (or the dict form of Request.of)
    answer.body()                                         # response bytes, or answer.job_key:
    service.compute_job(request)           # long ones, for the JobBoard: (bytes, keep)

Plain synchronous Python (no web framework), so the FastAPI mixin calls it from a threadpool and
the Ray Serve analysis deployment calls it in its replicas: the routes and the analyses are the
same code either way.  It holds four pieces:

- :class:`~mechray.api.store_view.StoreView`: the store, its manifest parsed once per change;
- :class:`~mechray.api.planner.Planner`: request -> :class:`~mechray.api.planner.Plan` (every
  4xx check, the cost estimate, the cache key: analysis, layers, params, manifest version);
- :class:`~mechray.api.result_cache.ResultCache`: results bounded in bytes, computed once;
- :class:`~mechray.api.upload_store.UploadStores`: uploads as private one-shard stores.

Analyses run through :class:`mechray.analysis.engine.Engine`, fanned out as Ray tasks when Ray is
initialised (``config.use_ray=None``) and in-process otherwise; uploads always run in-process.
A store whose shard fails its checks answers 503 ``store_corrupt`` naming the shard file and
``mechray repair``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
import uuid
from typing import Any, NamedTuple, Optional

import torch

from mechray.analysis.base import analysis_class
from mechray.api.errors import ApiError
from mechray.api.planner import CODE_PARAMS, Plan, Planner
from mechray.api.request import Request
from mechray.api.result_cache import Result, ResultCache
from mechray.api.saes import ServedSAEs
from mechray.api.store_view import StoreView
from mechray.api.upload_store import UploadStores
from mechray.config import MechIntConfig
from mechray.errors import ShardError

__all__ = ["Answer", "CODE_PARAMS", "Interpreter"]
log = logging.getLogger(__name__)
KEEP_UPLOAD_STORES = 8
_SHARD_FILE = re.compile(r"shard '?([\w.-]+\.(?:pt|safetensors))")
_CORRUPT = ("checksum", "truncated", "corrupt", "missing", "could not be loaded")


class Answer(NamedTuple):
    """A request's outcome: a result now (``cached`` or computed), or a job to queue."""

    result: Optional[Result] = None
    job_key: Optional[str] = None
    cached: bool = False

    def body(self) -> bytes:
        assert self.result is not None
        return self.result.render(self.cached)


class Interpreter:
    """One store (and optionally a model) served to many concurrent requests."""

    def __init__(self, model: Optional[torch.nn.Module], config: MechIntConfig | dict, *,
                 location: Optional[str] = None, tokenizer: Any = None,
                 saes: Optional[dict[str, str] | ServedSAEs] = None):
        from mechray.analysis.runner import default_location

        self.config = cfg = MechIntConfig.coerce(config)
        self.tokenizer = tokenizer          # top rows answered with their token contexts
        self.model = model.eval() if model is not None else None
        self.location = str(location or default_location(cfg))
        params = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self.view = StoreView(self.location, cfg)
        self.saes = saes if isinstance(saes, ServedSAEs) else ServedSAEs(saes)
        self.planner = Planner(self.view, cfg, params, self.saes)
        self.cache = ResultCache(int(cfg.api_cache_mb * 2 ** 20), cfg.api_cache_entries)
        self.uploads = UploadStores(KEEP_UPLOAD_STORES)
        self._slots = threading.BoundedSemaphore(cfg.api_max_concurrent)
        self._model_lock = threading.Lock()

    # --- the store -------------------------------------------------------------------------------
    def layers_json(self) -> bytes:
        return self.view.layers_json(self.saes.public())

    def shards_json(self, offset: int = 0, limit: int = 1000) -> bytes:
        return self.view.shards_json(offset, limit)

    def health(self) -> dict[str, Any]:
        return {"store_ready": self.view.ready(), "ray": self._use_ray()}

    # --- requests --------------------------------------------------------------------------------
    def plan(self, request: Request | dict[str, Any]) -> Plan:
        """Validate a request (4xx if bad): what to run, its cost and its cache key (eval
        inputs, when given, are parsed, costed on and part of the key).  Planned once."""
        request = Request.of(request)
        if request.eval_inputs is None:
            return self.planner.plan(request)
        from mechray.analysis.inputs import PromptPairs
        from mechray.api.eval_inputs import parse_eval_inputs

        target = self.planner.target(request)       # analysis, params and layer checked first
        if target.cls.kind != "model" or target.upload is not None:
            raise ApiError(422, "bad_eval_inputs", f"eval_inputs are used only by the analyses "
                           f"that run the served model on a captured layer (causal, circuit), "
                           f"not by {target.analysis}" + (" on an upload" if target.upload
                                                          else "") + "; drop eval_inputs")
        data, digest = parse_eval_inputs(request.eval_inputs, self.tokenizer, self.model)
        ids = data.clean["input_ids"] if isinstance(data, PromptPairs) else data["input_ids"]
        plan = self.planner.cost(target, inputs=len(ids))   # costed on them
        key = hashlib.sha256(f"{plan.key}:{digest}".encode()).hexdigest()
        return dataclasses.replace(plan, eval_data=data, key=key)

    def lookup(self, request: Request | dict[str, Any]) -> tuple[Plan, Optional[Result]]:
        """The request's plan (4xx if bad) and its cached result, if any."""
        plan = self.plan(request)
        return plan, self.cache.get(plan.key)

    def interpret(self, request: Request | dict[str, Any]) -> Answer:
        """Answered now (cached, or a short analysis) or ``Answer(job_key=...)`` to queue."""
        plan, hit = self.lookup(request)
        if hit is not None:
            return Answer(hit, cached=True)
        if self.is_job(plan):
            return Answer(job_key=plan.key)
        return self._compute(plan)

    def is_job(self, plan: Plan) -> bool:
        """Whether ``plan`` runs as a job (``api_job_analyses``, or over ``api_job_cost``)."""
        return plan.analysis in self.config.api_job_analyses or \
            plan.cost.ops > self.config.api_job_cost

    def compute_plan(self, plan: Plan, request: Request) -> Answer:
        """The answer to a request planned elsewhere (a Serve ingress, on the same config): its
        plan is used as it is, not planned again, unless this store is at another manifest
        version than the plan's (then ``request`` is planned here, and may become a job)."""
        if plan.upload is None and plan.source != self.view.snapshot().version:
            return self.interpret(request)
        hit = self.cache.get(plan.key)
        return Answer(hit, cached=True) if hit is not None else self._compute(plan)

    def compute(self, request: Request | dict[str, Any]) -> bytes:
        """The response bytes for ``request`` (validated again), computed or from the cache."""
        plan, hit = self.lookup(request)
        return (Answer(hit, cached=True) if hit is not None else self._compute(plan)).body()

    def compute_job(self, request: Request | dict[str, Any]) -> tuple[bytes, bool]:
        """:meth:`compute` for the job board: ``(bytes, keep)``, ``keep`` False when the result
        failed inside (an analysis error on a layer), so the board does not re-serve it."""
        plan, hit = self.lookup(request)
        answer = Answer(hit, cached=True) if hit is not None else self._compute(plan)
        assert answer.result is not None
        return answer.body(), answer.result.cacheable

    def remember(self, plan: Plan, result: Result) -> None:
        """Cache a result computed elsewhere (a Serve analysis replica) under ``plan``'s key,
        unless it was computed on another manifest version than the plan's."""
        if plan.upload is None and result.head.get("manifest_version") != plan.source:
            return
        self.cache.put(plan.key, result)

    # --- computing -------------------------------------------------------------------------------
    def _compute(self, plan: Plan) -> Answer:
        result, shared = self.cache.compute_once(plan.key, lambda: self._run(plan))
        return Answer(result, cached=shared)

    def _run(self, plan: Plan) -> Result:
        from mechray.analysis.engine import Engine
        from mechray.analysis.runner import json_safe

        name, upload = plan.analysis, plan.upload
        use_ray: Optional[bool]
        with self._slots:
            t0 = time.perf_counter()
            if upload is not None:
                store, use_ray = self.uploads.get(upload), False
            else:
                store, use_ray = self.view.snapshot().store, self.config.use_ray
            model_lock = self._model_lock if analysis_class(name).kind == "model" else \
                contextlib.nullcontext()
            try:
                if upload is None:            # planned on the summary: checked on the entries
                    self.planner.check_entries(plan)
                engine = Engine(store, use_ray=use_ray, progress=False,
                                num_cpus=self.config.analysis_num_cpus,
                                seed=self.config.sample_seed)
                with model_lock:
                    results = engine.run([name], {name: plan.engine_params}, layers=plan.layers,
                                         model=self.model, eval_data=plan.eval_data)
                if self.tokenizer is not None and upload is None:
                    from mechray.analysis.contexts import add_contexts, decoder, name_positions

                    add_contexts(results, store, decoder(self.tokenizer))
                    name_positions(results, decoder(self.tokenizer))
                    if self.model is not None:          # logit lens of residual-stream units
                        from mechray.analysis.lens import add_logit_lens

                        add_logit_lens(results, self.model, decoder(self.tokenizer))
            except ShardError as exc:
                raise store_error(exc) from None
            seconds = round(time.perf_counter() - t0, 4)
        per_layer = json_safe(results[name])
        params = plan.params.model_dump(mode="json")   # the JSON edge
        if plan.run_params is not None:      # a served SAE: answered by name, never its path
            for value in per_layer.values():
                if isinstance(value, dict) and isinstance(value.get("pretrained"), dict):
                    value["pretrained"]["path"] = None
                    value["pretrained"]["name"] = params["pretrained"]
        head: dict[str, Any]
        if upload is not None:
            head = {"analysis_type": name, "params": params,
                    "upload": {"sha256": upload.sha256, "format": upload.kind,
                               "layers": upload.shapes()}}
            return Result.of(head, "results", {la: per_layer[la] for la in plan.layers},
                             seconds)
        head = {"analysis_type": name, "layer_name": plan.layer, "params": params,
                "manifest_version": plan.source}
        return Result.of(head, "result", per_layer[plan.layer], seconds)

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
        self.uploads.close()


def store_error(exc: ShardError) -> ApiError:
    """A 503 for a shard that cannot be read: the shard's file name (never a path) and the fix;
    the full message goes to the log under the returned request id."""
    rid = uuid.uuid4().hex[:12]
    text = str(exc)
    log.error("mechray: request %s: the store could not be read: %s", rid, text)
    found = _SHARD_FILE.search(text)
    shard = f"shard {found.group(1)}" if found else "a shard"
    if any(word in text for word in _CORRUPT):
        return ApiError(503, "store_corrupt",
                        f"{shard} of the store is missing or fails its checksum; run `mechray "
                        "repair` on the store (it sets damaged shards aside), then retry. "
                        f"Request id {rid} in the server log has the details", request_id=rid)
    return ApiError(503, "store_unreadable", f"{shard} of the store could not be read (it may be "
                    f"unreachable for now); retry later. Request id {rid} in the server log has "
                    "the details", request_id=rid, headers={"Retry-After": "5"})
