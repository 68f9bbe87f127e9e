"""One registry of analyses: an analysis defined here, outside mechray, goes through config
validation, the engine (in one process and as Ray tasks), the report, the API's cost estimate and
``POST /interpret`` over real HTTP, with no edit to mechray."""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest
import torch
from conftest import capture_tiny
from fastapi import FastAPI
from pydantic import Field

from mechray import (
    EvalMechIntRunner,
    FastAPIIntegrationMixin,
    MechIntConfig,
)
from mechray.analysis.base import (
    REGISTRY,
    Analysis,
    AnalysisRegistryError,
    Cost,
    Params,
    Workload,
    register,
)
from mechray.analysis.engine import Engine
from mechray.api.cost import estimate
from mechray.storage.reader import ShardStore
from mechray.testing import serve_in_thread

LAYERS = ["mamba_backbone.blocks.1", "popt"]


class SpreadParams(Params):
    scale: float = Field(1.0, gt=0, le=100, description="multiplies every range")


class Spread(Analysis):
    """Per-neuron range (max - min), scaled: an exactly mergeable statistic."""

    name = "spread_test"
    kind = "stat"
    Params = SpreadParams
    columns = (("max range", lambda r: max(r["range"])), ("rows", lambda r: r["rows"]))
    plot_file = "spread_test.png"

    @staticmethod
    def plot(per_layer, plt):
        fig, ax = plt.subplots()
        for layer, r in per_layer.items():
            ax.plot(r["range"], label=layer)
        return fig

    @classmethod
    def cost(cls, p, w):
        return Cost(ops=7.0 * w.rows * w.d, bytes=float(w.shard_rows * w.d * 8))

    def map(self, rows, entry, layer):
        x = rows.double()
        return x.min(0).values, x.max(0).values, x.shape[0]

    def merge(self, a, b):
        return torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1]), a[2] + b[2]

    def finalize(self, partial, ctx, layer):
        lo, hi, n = partial
        return {"range": ((hi - lo) * self.params.scale).tolist(), "rows": n}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(Spread)
    # Ray workers cannot import this test module: send its classes by value, as a notebook would
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    REGISTRY.pop(Spread.name, None)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    return capture_tiny(path, LAYERS), path


def expected_range(path, layer, scale=1.0):
    rows = np.concatenate([r.double().numpy() for _, r in ShardStore(path).iter_layer(layer)])
    return (rows.max(0) - rows.min(0)) * scale


def test_config_knows_registered_analyses_and_refuses_unknown_ones():
    cfg = MechIntConfig(sample_layers=LAYERS, analyses_to_run=["spread_test", "neuron"],
                        analysis_params={"spread_test": {"scale": 2.0}})
    assert cfg.analyses_to_run == ["spread_test", "neuron"]
    with pytest.raises(ValueError, match="spread_tset.*did you mean 'spread_test'"):
        MechIntConfig(sample_layers=LAYERS, analyses_to_run=["spread_tset"])


def test_registering_a_taken_name_is_an_error():
    class Impostor(Spread):
        name = "neuron"

    with pytest.raises(AnalysisRegistryError, match="'neuron' is taken by .*NeuronStats"):
        register(Impostor)
    with pytest.raises(AnalysisRegistryError, match="kind='bogus'"):
        register(type("Bad", (Analysis,), {"name": "bad_kind", "kind": "bogus"}))
    assert REGISTRY["neuron"].__name__ == "NeuronStats" and "bad_kind" not in REGISTRY


def test_runner_and_report_use_the_registered_class(store, tmp_path):
    net, path = store
    cfg = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False,
                        analyses_to_run=["spread_test"], analysis_params={"spread_test":
                                                                          {"scale": 3.0}})
    runner = EvalMechIntRunner(net, cfg)
    results = runner.run_mechint_eval(hidden_shards_path=str(path))
    for layer in LAYERS:
        got = np.asarray(results["spread_test"][layer]["range"])
        np.testing.assert_allclose(got, expected_range(path, layer, 3.0), rtol=1e-12)
    runner.export_results(tmp_path)
    report = (tmp_path / "mechint_report.md").read_text()
    assert "## spread_test" in report and "| layer | max range | rows |" in report
    assert "![spread_test](spread_test.png)" in report
    assert (tmp_path / "spread_test.png").stat().st_size > 1000


def test_ray_tasks_run_a_third_party_analysis(store, ray_local):
    _, path = store
    results = Engine(str(path), use_ray=True, progress=False).run(["spread_test"])
    np.testing.assert_allclose(results["spread_test"]["popt"]["range"],
                               expected_range(path, "popt"), rtol=1e-12)


def test_api_cost_and_http_route_use_the_registered_class(store):
    net, path = store
    w = Workload(rows=1000, d=8, shard_rows=100)
    assert estimate("spread_test", {"scale": 1.0}, w) == Cost(7.0 * 1000 * 8, 100 * 8 * 8.0)
    cfg = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), verbose=False)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(net, cfg)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            ok = httpx.post(f"{url}/interpret", json={"analysis_type": "spread_test",
                                                      "layer_name": "popt",
                                                      "params": {"scale": 2.0}}, timeout=60)
            bad = httpx.post(f"{url}/interpret", json={"analysis_type": "spread_test",
                                                       "layer_name": "popt",
                                                       "params": {"scale": -1}}, timeout=60)
    finally:
        mixin.close()
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["result"]["range"], expected_range(path, "popt", 2.0),
                               rtol=1e-12)
    assert bad.status_code == 422 and "scale" in bad.text


class Broken(Spread):
    """Fails in ``map`` on one layer: a bug in a third-party analysis."""

    name = "broken_test"

    def map(self, rows, entry, layer):
        if layer == "popt":
            raise RuntimeError("boom in map")
        return super().map(rows, entry, layer)


def test_strict_engine_raises_where_the_default_skips_the_layer(store):
    """``Engine(strict=True)`` raises a failing ``map`` (a bug to see at once); by default the
    failure is recorded on that layer and the other layers still get their result."""
    _, path = store
    register(Broken)
    try:
        loose = Engine(ShardStore(path), use_ray=False, progress=False).run(["broken_test"])
        assert loose["broken_test"]["popt"]["skipped"] is True
        assert "boom in map" in loose["broken_test"]["popt"]["error"]
        assert "range" in loose["broken_test"][LAYERS[0]]
        with pytest.raises(RuntimeError, match="boom in map"):
            Engine(ShardStore(path), use_ray=False, progress=False, strict=True).run(["broken_test"])
    finally:
        REGISTRY.pop(Broken.name, None)
