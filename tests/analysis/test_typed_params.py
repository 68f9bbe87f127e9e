"""An analysis's parameters are validated once, where they enter, and travel as its typed
``Params`` instance: into ``cost`` (defaults filled in, no dict restating them), to every map,
merge and finalize of an engine run, and through one HTTP request from the planner to the engine."""

from __future__ import annotations

import dataclasses
import pickle
import threading

import httpx
import pytest
import torch
from conftest import capture_tiny
from fastapi import FastAPI
from pydantic import Field, model_validator

from mechray import FastAPIIntegrationMixin, MechIntConfig
from mechray.analysis.base import (
    REGISTRY,
    Analysis,
    AnalysisParamsError,
    Cost,
    Params,
    Workload,
    analysis_class,
    get_analysis,
    register,
)
from mechray.analysis.engine import Engine
from mechray.analysis.neuron import NeuronParams
from mechray.api.cost import answer_bytes, estimate
from mechray.api.planner import Planner
from mechray.api.request import Request
from mechray.api.service import Interpreter
from mechray.api.store_view import StoreView
from mechray.storage.reader import ShardStore
from mechray.testing import serve_in_thread

LAYERS = ["mamba_backbone.blocks.1", "popt"]
VALIDATIONS = {"n": 0}          # CountedParams validations in this process
_COUNT = threading.Lock()


class CountedParams(Params):
    scale: float = Field(2.0, gt=0, le=100)
    width: int = Field(7, ge=1, le=1000, description="only read by cost")

    @model_validator(mode="after")
    def _count(self) -> "CountedParams":
        with _COUNT:
            VALIDATIONS["n"] += 1
        return self


class Counted(Analysis):
    """Per-neuron maximum, scaled; records the params object each step received."""

    name = "counted_test"
    kind = "stat"
    Params = CountedParams
    seen: list[tuple[str, int]] = []              # (step, id(self.params)) in this process
    costed: list[object] = []                     # what cost received

    @classmethod
    def cost(cls, p: CountedParams, w: Workload) -> Cost:
        cls.costed.append(p)
        return Cost(float(p.width) * w.rows * w.d, float(p.width) * w.shard_rows * w.d)

    @classmethod
    def answer_bytes(cls, p: CountedParams, w: Workload) -> float:
        return 100.0 * p.width

    def map(self, rows, entry, layer):
        self.seen.append(("map", id(self.params)))
        return rows.double().reshape(len(rows), -1).max(0).values

    def merge(self, a, b):
        self.seen.append(("merge", id(self.params)))
        return torch.maximum(a, b)

    def finalize(self, partial, ctx, layer):
        self.seen.append(("finalize", id(self.params)))
        return {"max": (partial * self.params.scale).tolist()}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(Counted)
    yield
    REGISTRY.pop(Counted.name, None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    net = capture_tiny(path, LAYERS, steps=(0, 1, 2, 3))   # 4 shards per layer
    return net, path


@pytest.fixture(autouse=True)
def fresh_counts():
    VALIDATIONS["n"] = 0
    Counted.seen.clear()
    Counted.costed.clear()


def test_an_engine_run_validates_each_analysis_once_and_every_step_gets_that_object(store):
    _, path = store
    engine = Engine(str(path), use_ray=False, progress=False, shards_per_task=1)
    results = engine.run(["counted_test", "neuron"], {"counted_test": {"scale": 3.0},
                                                      "neuron": {"top_k": 2}})
    assert VALIDATIONS["n"] == 1                      # not once per shard, merge or finalize
    steps = [step for step, _ in Counted.seen]
    assert steps.count("map") == 8 and steps.count("finalize") == 2   # 4 shards x 2 layers
    assert steps.count("merge") == 6                  # 4 partials folded per layer
    assert len({ident for _, ident in Counted.seen}) == 1     # one Params object throughout
    assert set(results["counted_test"]) == set(LAYERS)
    assert results["neuron"]["popt"]["top_k"]["k"] == 2

    given = CountedParams(scale=0.5)                  # a Params instance: taken as it is
    VALIDATIONS["n"], Counted.seen[:] = 0, []
    halved = engine.run(["counted_test"], {"counted_test": given})
    assert VALIDATIONS["n"] == 0
    assert {ident for _, ident in Counted.seen} == {id(given)}
    for layer in LAYERS:
        assert halved["counted_test"][layer]["max"] == pytest.approx(
            [v / 6 for v in results["counted_test"][layer]["max"]])
    pickle.loads(pickle.dumps(given))                 # what Ray does to a task's Spec
    assert VALIDATIONS["n"] == 0


def test_params_are_validated_once_and_bad_ones_still_name_the_field():
    p = analysis_class("counted_test").validate_params({"width": 3})
    assert isinstance(p, CountedParams) and VALIDATIONS["n"] == 1
    assert get_analysis("counted_test", p).params is p and VALIDATIONS["n"] == 1
    with pytest.raises(AnalysisParamsError, match=r"scale=-1: .*greater than 0"):
        get_analysis("counted_test", {"scale": -1})
    with pytest.raises(AnalysisParamsError, match="are a NeuronParams; pass a dict or "
                                                  "CountedParams"):
        get_analysis("counted_test", NeuronParams())


def test_cost_receives_the_typed_params_with_their_defaults():
    w = Workload(rows=1000, d=8, shard_rows=100)
    assert estimate("counted_test", {}, w) == Cost(7.0 * 1000 * 8, 7.0 * 100 * 8)  # width=7
    assert isinstance(Counted.costed[-1], CountedParams)
    assert answer_bytes("counted_test", {"width": 2}, w) == 200.0
    # a built-in analysis: the default top_k (5) is the Params' own, not restated in cost
    neuron = analysis_class("neuron")
    default = neuron.validate_params({})
    assert default.top_k == 5
    assert neuron.cost(default, w) == estimate("neuron", {"top_k": 5}, w) != \
        estimate("neuron", {"top_k": 6}, w)


def test_one_http_request_is_planned_and_validated_once(store):
    net, path = store
    cfg = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False,
                        use_ray=False)
    planner = Planner(StoreView(str(path), cfg), cfg)
    plan = planner.plan(Request("counted_test", "popt", {"scale": 4.0}))
    assert VALIDATIONS["n"] == 1 and Counted.costed == [plan.params]
    assert Counted.costed[0] is plan.params and plan.params.width == 7
    rows = [r.reshape(len(r), -1) for _, r in ShardStore(path).iter_layer("popt")]
    assert plan.cost.ops == 7.0 * sum(len(r) for r in rows) * rows[0].shape[1]  # width=7
    VALIDATIONS["n"] = 0
    Counted.costed.clear()

    app = FastAPI()
    mixin = FastAPIIntegrationMixin(net, cfg)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            ok = httpx.post(f"{url}/interpret", json={"analysis_type": "counted_test",
                                                      "layer_name": "popt",
                                                      "params": {"scale": 4.0}}, timeout=60)
            bad = httpx.post(f"{url}/interpret", json={"analysis_type": "counted_test",
                                                       "layer_name": "popt",
                                                       "params": {"width": 0}}, timeout=60)
    finally:
        mixin.close()
    assert ok.status_code == 200, ok.text
    assert ok.json()["params"] == {"scale": 4.0, "width": 7}      # dumped at the JSON edge
    # planned once (cost saw one object) and that object ran: one validation in all
    assert len(Counted.costed) == 1 and VALIDATIONS["n"] == 1
    assert {ident for _, ident in Counted.seen} == {id(Counted.costed[0])}
    assert bad.status_code == 422 and bad.json()["error"] == "bad_params" and "width" in bad.text


def test_a_plan_made_elsewhere_runs_as_it_is_unless_the_store_moved_on(store):
    """What a Serve ingress and an analysis replica do: one plans, the other computes that plan
    (no second validation); a plan of another manifest version is planned again."""
    net, path = store
    cfg = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False,
                        use_ray=False)
    ingress, replica = Interpreter(None, cfg), Interpreter(net, cfg)
    request = Request("counted_test", "popt", {"scale": 4.0})
    plan, hit = ingress.lookup(request)
    assert hit is None and not ingress.is_job(plan) and VALIDATIONS["n"] == 1
    answer = replica.compute_plan(plan, request)
    assert VALIDATIONS["n"] == 1 and len(Counted.costed) == 1      # not planned again
    assert {ident for _, ident in Counted.seen} == {id(plan.params)}
    assert answer.result is not None and answer.result.head["manifest_version"] == plan.source
    assert replica.compute_plan(plan, request).cached

    stale = dataclasses.replace(plan, source="an older manifest", key="k" * 64)
    again = replica.compute_plan(stale, request)
    assert VALIDATIONS["n"] == 2 and again.cached        # planned here: the current version's key
    assert again.body() == replica.compute_plan(plan, request).body()
