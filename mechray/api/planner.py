"""Turning a request into a :class:`Plan`: validated params, layers, cost checked, cache key.

Usage::

    from mechray.api.planner import Planner

    planner = Planner(view, config, model_params=0)
    plan = planner.plan(Request("neuron", "popt", {"top_k": 8}))
    plan.key, plan.cost.ops, plan.layers     # 4xx ApiError first if anything is wrong
    plan.params.top_k                        # the analysis's validated Params: 8

    target = planner.target(request)         # the same in two steps, for a request whose eval
    plan = planner.cost(target, inputs=12)   # inputs are parsed in between (costed on them)

Every check runs here, before anything is computed: the analysis is registered, its params
validate (bounded, nested at most :data:`MAX_PARAMS_DEPTH` deep, none that imports code), the
layer exists (404 naming the valid ones), and the estimated operations, peak memory and answer
size are under ``config.api_max_cost``, ``api_max_memory_mb`` and ``api_max_answer_mb``.
The params are validated once, into the analysis's ``Params``; that instance is what ``cost``
receives and what the engine runs (it is dumped to JSON only for the cache key and the answer).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Optional

from pydantic import BaseModel

from mechray.analysis.base import REGISTRY, Analysis, AnalysisParamsError, analysis_class
from mechray.api.cost import Workload
from mechray.api.errors import ApiError
from mechray.api.request import Request
from mechray.api.saes import ServedSAEs
from mechray.api.store_view import StoreView
from mechray.api.uploads import Upload, check_layer_name
from mechray.config import MechIntConfig
from mechray.storage.entry import LayerSummary

CODE_PARAMS = ("loss_fn",)          # parameters that import code: refused over HTTP
MAX_PARAMS_DEPTH = 32


@dataclass(frozen=True)
class Estimate:
    """A request's cost: operations (all layers), peak bytes (one layer at a time) and the bytes
    of its JSON answer (all layers)."""

    ops: float
    bytes: float
    answer: float


@dataclass(frozen=True)
class Target:
    """A request checked up to its cost: the analysis, its validated params, the layers and
    what each layer holds (``work``; the model inputs are filled in by :meth:`Planner.cost`)."""

    analysis: str
    cls: type[Analysis]
    params: BaseModel                   # the analysis's Params, validated once
    layers: list[str]
    layer: Optional[str]
    upload: Optional[Upload]
    source: str
    work: list[Workload]
    served: Optional[str] = None        # a served SAE's name (sae's params.pretrained)


@dataclass(frozen=True)
class Plan:
    """What one request runs: the analysis on ``layers`` of the store or of an upload."""

    analysis: str
    params: BaseModel                   # the analysis's validated Params (JSON: model_dump)
    layers: list[str]
    layer: Optional[str]                # as requested (None: every layer of an upload)
    upload: Optional[Upload]
    source: str                         # the manifest version, or "upload:<sha256>"
    cost: Estimate
    key: str                            # the cache key: analysis, layers, params, source
    eval_data: Any = None               # the request's eval inputs (keyword tensors), if any
    run_params: Optional[BaseModel] = None   # params as the engine gets them: a served
    #                                     SAE's name (params.pretrained) turned into its path
    work: tuple[Workload, ...] = ()     # what it was costed on, per layer
    served: Optional[str] = None        # the served SAE's name (params.pretrained), if any

    @property
    def engine_params(self) -> BaseModel:
        return self.params if self.run_params is None else self.run_params


class Planner:
    """Validates requests against the store view and the config; see the module docstring."""

    def __init__(self, view: StoreView, config: MechIntConfig, model_params: int = 0,
                 saes: Optional[ServedSAEs] = None):
        self.view, self.config, self.model_params = view, config, model_params
        self.saes = saes if saes is not None else ServedSAEs()

    def plan(self, request: Request, inputs: Optional[int] = None) -> Plan:
        """``inputs``: how many eval inputs the request brings (default: the config's cap)."""
        return self.cost(self.target(request), inputs)

    def target(self, request: Request) -> Target:
        """Every check but the cost: the analysis, its params (validated once), the layer."""
        analysis, upload, layer = request.analysis, request.upload, request.layer
        cls, spec = self.params(analysis, request.params)
        served = getattr(spec, "pretrained", None) if analysis == "sae" else None
        if served is not None:
            self.saes.info(served)                   # a registered name, never a path: 422
        if upload is not None:
            source = f"upload:{upload.sha256}"
            layers = self._upload_layers(upload, layer)
            work = [Workload(len(upload.tensors[la]), upload.tensors[la].shape[1],
                             len(upload.tensors[la])) for la in layers]
        else:
            info, source, n_layers = self._store_layer(layer)
            facts = self.view.facts(str(layer))     # the summary; checked on the entries
            #                                         before the run (check_entries)
            work = [Workload(facts.rows, info.features, facts.largest, max(facts.steps, 1),
                             self.model_params, n_layers, self.config.eval_max_samples)]
            layers = [check_layer_name(layer)]
        return Target(analysis, cls, spec, layers, layer, upload, source, work, served)

    def cost(self, target: Target, inputs: Optional[int] = None) -> Plan:
        """``target`` costed (422 over the limits) and keyed: the :class:`Plan`.  ``inputs``:
        how many eval inputs the request brings (default: the config's cap)."""
        t, spec, served = target, target.params, target.served
        work = t.work if not inputs or t.upload is not None else \
            [replace(w, inputs=inputs) for w in t.work]
        run_params = None
        if served is not None:               # its own size, not the params' expansion_factor
            paths = {self.saes.resolve(served, la, w.d) for la, w in zip(t.layers, work)}
            run_params = spec.model_copy(update={"pretrained": paths.pop()})
        cost = self._estimate(t.cls, spec, work, served)
        self._check_cost(t.analysis, cost)
        key = hashlib.sha256(json.dumps([t.analysis, t.layers, spec.model_dump(mode="json"),
                                         t.source], sort_keys=True).encode()).hexdigest()
        return Plan(t.analysis, spec, t.layers, t.layer, t.upload, t.source, cost, key,
                    run_params=run_params, work=tuple(work), served=served)

    def check_entries(self, plan: Plan) -> None:
        """Before a plan on the store runs: its layer as the manifest's entries have it (a
        404 when none holds it), and its cost again on the entries' figures when they differ
        from what it was planned on (a manifest head's word): 422 when over the limits, so a
        head that lies can mis-size a plan but never run one the limits refuse.  The entries
        are the ones the run reads anyway (parsed once per manifest version)."""
        if plan.upload is None and plan.layer is not None and len(plan.work) == 1:
            facts = self.view.entry_facts(plan.layer)
            planned = plan.work[0]
            work = dataclasses.replace(planned, rows=facts.rows, shard_rows=facts.largest,
                                       steps=max(facts.steps, 1))
            if work != planned:
                self._check_cost(plan.analysis, self._estimate(
                    analysis_class(plan.analysis), plan.params, [work], plan.served))

    def _estimate(self, cls: type[Analysis], spec: BaseModel, work: list[Workload],
                  served: Optional[str]) -> Estimate:
        costs = [cls.cost(spec, w) for w in work]
        weights, ops = 0, 0.0
        if served is not None:
            sae = self.saes.info(served)
            weights = sae.weight_bytes
            ops = sum(4.0 * w.rows * w.d * sae.n_latents for w in work)  # encode, decode, top
        return Estimate(sum(c.ops for c in costs) + ops, max(c.bytes for c in costs) + weights,
                        sum(float(cls.answer_bytes(spec, w)) for w in work))

    def params(self, analysis: str, params: Any) -> tuple[type[Analysis], BaseModel]:
        """The analysis's class and its validated ``Params`` (422 naming the problem)."""
        if not isinstance(params, dict):
            raise ApiError(422, "bad_params", f"params must be a JSON object, got "
                           f"{type(params).__name__}")
        depth = nesting(params)
        if depth > MAX_PARAMS_DEPTH:
            raise ApiError(422, "bad_params", f"params nest {depth} levels deep; at most "
                           f"{MAX_PARAMS_DEPTH} (analysis parameters are flat values)")
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
            cls = analysis_class(analysis)
            return cls, cls.validate_params(params)
        except KeyError as exc:
            raise ApiError(422, "unknown_analysis", str(exc.args[0]),
                           valid=sorted(REGISTRY)) from None
        except AnalysisParamsError as exc:
            raise ApiError(422, "bad_params", str(exc)) from None

    def _store_layer(self, layer: Optional[str]) -> tuple[LayerSummary, str, int]:
        """The layer's catalog entry, the manifest version and the number of captured layers."""
        if layer is None:
            raise ApiError(422, "missing_layer_name", "layer_name is required; GET "
                           "/interpret/layers lists the captured layers")
        check_layer_name(layer)
        snap = self.view.snapshot()
        info = snap.layers.get(layer)
        if info is None:
            close = difflib.get_close_matches(layer, list(snap.layers), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ApiError(404, "unknown_layer", f"layer {layer!r} is not in "
                           f"{snap.store.location}{hint}; captured layers: {sorted(snap.layers)}",
                           valid=sorted(snap.layers))
        return info, snap.version, len(snap.layers)

    def _upload_layers(self, upload: Upload, layer: Optional[str]) -> list[str]:
        if layer is None:
            return list(upload.tensors)
        check_layer_name(layer)
        if layer not in upload.tensors:
            raise ApiError(404, "unknown_layer", f"layer {layer!r} is not in the uploaded file; "
                           f"it holds {sorted(upload.tensors)}", valid=sorted(upload.tensors))
        return [layer]

    def _check_cost(self, analysis: str, cost: Estimate) -> None:
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
        if cost.answer > cfg.api_max_answer_mb * 2 ** 20:
            raise ApiError(422, "too_expensive",
                           f"{analysis}'s answer here would be about "
                           f"{cost.answer / 2 ** 20:,.0f} MiB of JSON, over api_max_answer_mb="
                           f"{cfg.api_max_answer_mb:g} (it grows with the features per row: "
                           "a 1-D upload is one row of many features; upload [rows, features], "
                           "or run `mechray analyze`, which writes results to files)")


def nesting(value: Any) -> int:
    """How deep dicts and lists nest in ``value`` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items = list(item.values())
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_PARAMS_DEPTH:
            return deepest
        stack.extend((x, depth + 1) for x in items)
    return deepest
