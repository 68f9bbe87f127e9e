"""neuron / feature / dynamics against numpy and scikit-learn on really captured shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mechray import ActivationSampler, ShardStore
from mechray.analysis import Context, get_analysis
from mechray.analysis.base import AnalysisParamsError, Skip
from mechray.analysis.engine import Engine


class Pass(nn.Module):
    """``layer`` outputs exactly its input; ``proj`` a fixed linear map of it."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.layer = nn.Identity()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(self.layer(x))


def capture(path, batches, steps, model=None, layers=("layer",), **kw):
    model = model or Pass(batches[0].shape[-1])
    sampler = ActivationSampler(layers=list(layers), save_dir=str(path), use_ray=False,
                                verbose=False, **kw)
    sampler.register_hooks(model)
    for x, step in zip(batches, steps):
        sampler.current_step = step
        with torch.no_grad():
            model(x)
        sampler.save_activations(step)
    sampler.close()
    return ShardStore(path)


def rows_of(store, layer="layer"):
    return np.concatenate([r.numpy().astype(np.float64) for _, r in store.iter_layer(layer)])


def run_stat(name, store, params=None, layer="layer", out_dir=None, order=None):
    a = get_analysis(name, params)
    parts = []
    for entry in store.shards(layer):
        payload = store.load(entry)
        e = dict(entry, row_steps=payload["metadata"]["row_steps"][layer])
        parts.append(a.map(payload["activations"][layer], e, layer))
    if order is not None:
        parts = [parts[i] for i in order]
    partial = parts[0]
    for p in parts[1:]:
        partial = a.merge(partial, p)
    return a.finalize(partial, Context(store=store, out_dir=out_dir), layer)


# --- neuron ------------------------------------------------------------------------------------
def test_neuron_exact_against_numpy_with_large_near_equal_means(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(5):  # shard means 1e4 + 1e-3 * i, per-neuron spread ~1e-2: cancellation trap
        x = 1e4 + 1e-3 * i + 1e-2 * torch.randn(40 + 7 * i, 4, generator=g)
        x[:, 3] = 0.0                                  # a dead neuron
        x[: 5 + i, 2] = 0.0                            # a partly sparse one
        batches.append(x)
    store = capture(tmp_path / "s", batches, steps=[0, 10, 20, 30, 40])
    got = run_stat("neuron", store, {"eps": 1e-6, "top_k": 3})
    x = rows_of(store)
    assert got["num_samples"] == len(x) == sum(len(b) for b in batches)
    np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["std"], x.std(0), rtol=1e-6, atol=1e-9)
    assert got["std"][0] == pytest.approx(x[:, 0].std(), rel=1e-6)
    assert 5e-3 < got["std"][0] < 2e-2                 # not swamped by the 1e4 mean
    np.testing.assert_array_equal(got["min"], x.min(0))
    np.testing.assert_array_equal(got["max"], x.max(0))
    np.testing.assert_allclose(got["sparsity"], (np.abs(x) <= 1e-6).mean(0))
    np.testing.assert_allclose(got["fraction_positive"], (x > 0).mean(0))
    assert got["dead_count"] == 1 and got["dead_neurons"] == [3]
    assert sum(got["histogram"]["counts"]) == x.size
    # the float32-naive formula E[x^2] - E[x]^2 would be off by orders of magnitude here
    x32 = x.astype(np.float32)
    naive = np.sqrt(np.maximum((x32 ** 2).mean(0) - x32.mean(0) ** 2, 0))
    assert abs(naive[0] - x[:, 0].std()) > 10 * abs(got["std"][0] - x[:, 0].std())


def test_neuron_top_k_names_shard_row_step_and_merge_order_does_not_matter(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(30, 5, generator=g) for _ in range(4)]
    batches[2][7, 1] = 50.0                            # the planted maximum of neuron 1
    store = capture(tmp_path / "s", batches, steps=[0, 5, 10, 15])
    a = run_stat("neuron", store, {"top_k": 4})
    b = run_stat("neuron", store, {"top_k": 4}, order=[3, 1, 0, 2])
    assert a["top_k"] == b["top_k"]
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)
    top = a["top_k"]
    assert top["values"][1][0] == 50.0 and top["step"][1][0] == 10 and top["row"][1][0] == 7
    x = rows_of(store)
    for n in range(5):
        np.testing.assert_array_equal(top["values"][n], np.sort(x[:, n])[::-1][:4])
        for v, shard, row, step in zip(top["values"][n], top["shard"][n], top["row"][n],
                                       top["step"][n]):
            payload = store.load(shard)
            assert payload["activations"]["layer"][row, n].item() == v
            assert payload["metadata"]["row_steps"]["layer"][row].item() == step


def test_neuron_ties_resolve_deterministically(tmp_path):
    store = capture(tmp_path / "s", [torch.zeros(6, 2), torch.zeros(6, 2)], steps=[0, 1])
    got = run_stat("neuron", store, {"top_k": 3})
    first = store.shards("layer")[0]["file"]
    assert got["top_k"]["shard"][0] == [first] * 3 and got["top_k"]["row"][0] == [0, 1, 2]
    assert got["dead_count"] == 2 and got["sparsity"] == [1.0, 1.0]


# --- feature -----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, tol", [("float64", 1e-9), ("float32", 1e-5)])
def test_pca_equals_sklearn_on_concatenated_rows(tmp_path, precision, tol):
    """float64 co-moments agree with scikit-learn (float64 rows) to 1e-9; the default float32
    ones (syrk per block, merged in float64) to float32 precision."""
    from safetensors.numpy import load_file
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(2)
    mix = torch.randn(8, 8, generator=g)
    batches = [(torch.randn(50 + 9 * i, 8, generator=g) * torch.linspace(3, 0.1, 8)) @ mix + 5.0
               for i in range(4)]
    store = capture(tmp_path / "s", batches, steps=[0, 1, 2, 3])
    out = tmp_path / "out"
    got = run_stat("feature", store, {"n_components": 5, "n_clusters": 3, "precision": precision},
                   out_dir=out)
    x = rows_of(store)
    ref = PCA(n_components=5, svd_solver="full").fit(x)
    np.testing.assert_allclose(got["explained_variance"], ref.explained_variance_, rtol=tol)
    np.testing.assert_allclose(got["explained_variance_ratio"], ref.explained_variance_ratio_,
                               rtol=tol)
    saved = load_file(str(out / got["components_path"]))
    comps = saved["components"]
    signs = np.sign(np.sum(comps * ref.components_, axis=1))
    np.testing.assert_allclose(comps * signs[:, None], ref.components_, atol=tol / 10)
    np.testing.assert_allclose(comps, ref.components_, atol=tol / 10)  # sklearn's sign convention
    np.testing.assert_allclose(saved["mean"], ref.mean_, rtol=tol / 1000)
    assert got["components_path"] == "feature/layer.safetensors"


def test_kmeans_streams_over_shards_and_finds_separated_blobs(tmp_path):
    g = torch.Generator().manual_seed(3)
    centers = torch.tensor([[0.0, 0, 0], [20, 0, 0], [0, 20, 0]])
    sizes = [120, 60, 90]
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    x = centers[labels] + 0.5 * torch.randn(len(labels), 3, generator=g)
    x = x[torch.randperm(len(x), generator=g)]
    store = capture(tmp_path / "s", list(x.split(45)), steps=list(range(6)))
    got = run_stat("feature", store, {"n_clusters": 3, "batch_size": 64, "kmeans_epochs": 3,
                                      "sample_size": 150})
    c = got["clustering"]
    assert sorted(c["sizes"]) == sorted(sizes) and c["rows"] == "all"
    assert c["silhouette"] > 0.8 and c["silhouette_rows"] == 150
    assert c["inertia"] == pytest.approx(0.25 * 3 * len(x), rel=0.25)   # sigma^2 * d * n


def test_feature_without_store_clusters_the_sample_and_inlines_components(tmp_path):
    store = capture(tmp_path / "s", [torch.randn(40, 4), torch.randn(40, 4)], steps=[0, 1])
    a = get_analysis("feature", {"n_components": 2, "n_clusters": 2})
    p = a.merge(*[a.map(r, e, "layer") for e, r in store.iter_layer("layer")])
    got = a.finalize(p, Context(store=None), "layer")
    assert np.asarray(got["components"]).shape == (2, 4) and got["clustering"]["rows"] == "sample"


def test_pca_of_rows_with_nan_or_inf_is_skipped_naming_the_features(tmp_path):
    """A diverged model's NaN/inf activations: the engine says which features and what to do,
    where PCA used to fail inside LAPACK ("array must not contain infs or NaNs")."""
    rows = torch.randn(60, 6)
    rows[3, 2], rows[50, 4] = float("nan"), float("inf")
    store = capture(tmp_path / "s", [rows[:30], rows[30:]], steps=[0, 1])
    got = Engine(store, use_ray=False, progress=False).run(
        ["feature"], {"feature": {"n_components": 2, "n_clusters": 2}})["feature"]["layer"]
    assert got.get("skipped") and "2 of its 6 features" in got["reason"], got
    assert "[2, 4]" in got["reason"] and "recapture" in got["reason"]


# --- params ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,field", [
    ("neuron", {"top_k": 0}, "top_k"), ("neuron", {"eps": -1}, "eps"),
    ("feature", {"n_clusters": 1}, "n_clusters"), ("feature", {"n_components": 0}, "n_components"),
    ("feature", {"sample_size": 5}, "sample_size"), ("dynamics", {"pairing": "rows"}, "pairing"),
    ("neuron", {"topk": 3}, "topk"),
])
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(AnalysisParamsError, match=field) as err:
        get_analysis(name, params)
    assert name in str(err.value) and "Valid parameters" in str(err.value)


def test_engine_rejects_bad_params_before_any_work(tmp_path):
    store = capture(tmp_path / "s", [torch.randn(8, 3)], steps=[0])
    with pytest.raises(AnalysisParamsError, match="n_clusters"):
        Engine(store, use_ray=False, progress=False).run(["neuron", "feature"],
                                                         {"feature": {"n_clusters": 1}})


# --- dynamics ----------------------------------------------------------------------------------
def _cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_dynamics_cka_on_a_fixed_probe_batch_matches_numpy(tmp_path):
    torch.manual_seed(4)
    model = Pass(5)
    probe = torch.randn(3, 7, 5)                      # a fixed probe batch [B, T, d]
    store_dir = tmp_path / "s"
    sampler = ActivationSampler(layers=["proj"], save_dir=str(store_dir), use_ray=False,
                                verbose=False, save_inputs=True)
    sampler.register_hooks(model)
    expected_rows = []
    for step in (0, 10, 20):
        with torch.no_grad():
            model.proj.weight.add_(0.3 * torch.randn(5, 5))      # "training" between steps
            out = nn.functional.linear(probe, model.proj.weight, model.proj.bias)  # no hooks
            expected_rows.append(out.reshape(-1, 5).double().numpy())
            sampler.current_step = step
            model(probe)
        sampler.save_activations(step)
        with torch.no_grad():                                     # an unrelated training batch
            sampler.current_step = step
            model(torch.randn(2, 7, 5))
        sampler.save_activations(step)
    sampler.close()
    got = get_analysis("dynamics", {"n_components": 2}).fit(Context(store=ShardStore(store_dir)),
                                                            "proj")
    assert got["steps"] == [0, 10, 20] and got["pairs"] == [[0, 10], [10, 20]]
    assert got["cka_pairing"] == ["same_inputs", "same_inputs"] and got["cka_rows"] == [21, 21]
    for i in range(2):
        want = _cka(expected_rows[i], expected_rows[i + 1])
        assert got["cka"][i] == pytest.approx(want, rel=1e-5)
    assert all(0.0 <= o <= 1.0 + 1e-9 for o in got["subspace_overlap"])
    assert got["rows_per_step"] == [35, 35, 35]


def test_dynamics_does_not_pair_different_inputs_and_overlap_is_one_for_same_subspace(tmp_path):
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([5.0, 3.0, 0.1, 0.1])
    batches = [torch.randn(200, 4, generator=g) * scale for _ in range(3)]
    store = capture(tmp_path / "s", batches, steps=[0, 1, 2], save_inputs=True)
    got = get_analysis("dynamics", {"n_components": 2}).fit(Context(store=store), "layer")
    assert got["cka"] == [None, None] and got["cka_pairing"] == ["unpaired", "unpaired"]
    assert min(got["subspace_overlap"]) > 0.99         # the top-2 subspace is the same plane
    forced = get_analysis("dynamics", {"pairing": "positions"}).fit(Context(store=store), "layer")
    assert forced["cka_pairing"] == ["positions", "positions"] and forced["cka"][0] < 0.2


def test_dynamics_skips_a_single_step_with_its_reason(tmp_path):
    store = capture(tmp_path / "s", [torch.randn(10, 3)], steps=[0])
    with pytest.raises(Skip, match="at least 2"):
        get_analysis("dynamics").fit(Context(store=store), "layer")
