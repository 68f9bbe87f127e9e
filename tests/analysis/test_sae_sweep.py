"""``sae`` with ``sweep``: several SAEs of one layer on one read of its shards.

Each SAE of a sweep is the SAE a fit of its setting alone trains (bit for bit: the same seed,
batches and steps), while the shards are loaded as often as for one fit, not once per SAE.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mechray.analysis import Context, get_analysis
from mechray.analysis.base import AnalysisParamsError
from mechray.analysis.report import write_report
from mechray.analysis.sae.model import load_sae
from mechray.storage.reader import ShardStore
from mechray.testing import planted_dictionary, rows_store

PARAMS = {"n_latents": 64, "k": 3, "batch_size": 128, "lr": 3e-3, "steps": 60, "device": "cpu",
          "top_latents": 2, "checkpoint_every": 25}


write_store = rows_store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(1)
    _, x = planted_dictionary(16, 32, 3, 3000, seed=0)
    return write_store(tmp_path_factory.mktemp("sweep_store"), x)


def counted(store: ShardStore) -> tuple[ShardStore, Counter]:
    """A fresh view of ``store`` whose shard loads are counted per file (``payloads`` and
    ``iter_layer`` read through ``load``)."""
    view, loads = ShardStore(store.root), Counter()
    real = view.load

    def load(shard, *args, **kw):
        loads[shard["file"] if isinstance(shard, dict) else str(shard)] += 1
        return real(shard, *args, **kw)

    view.load = load            # type: ignore[method-assign]
    return view, loads


def fit(store, out, **params):
    return get_analysis("sae", {**PARAMS, **params}).fit(Context(store=store, out_dir=out), "src")


def same_sae(a_path, b_path) -> None:
    a, b = load_sae(a_path), load_sae(b_path)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name


@pytest.mark.parametrize("grid", [{"k": [2, 4, 8]},
                                  {"min_steps": [30, 70], "architecture": ["topk", "relu"]}])
def test_a_sweep_trains_the_sae_of_each_setting_on_one_read_of_the_shards(store, tmp_path,
                                                                          grid):
    """``k`` (same budget) and ``min_steps`` x architecture (budgets of 30 and 70 steps: the
    short ones stop taking batches, the long ones go on): each SAE equals the fit of its
    setting alone bit for bit, and the sweep loads each shard as often as one fit does."""
    base = {**PARAMS, "steps": None, "max_epochs": None, "early_stop": False} \
        if "min_steps" in grid else PARAMS
    view, loads = counted(store)
    swept = get_analysis("sae", {**base, "sweep": grid}).fit(
        Context(store=view, out_dir=tmp_path / "sweep"), "src")
    sweep_loads = dict(loads)
    assert set(sweep_loads) == {e["file"] for e in store.shards("src")}
    labels = swept["sweep"]["settings"]
    assert len(labels) == len(swept["comparison"]) == len(swept["results"]) > 1
    alone_loads = []
    for label, row in zip(labels, swept["comparison"]):
        setting = {key: row[key] for key in grid}
        view, loads = counted(store)
        one = get_analysis("sae", {**base, **setting}).fit(
            Context(store=view, out_dir=tmp_path / label), "src")
        alone_loads.append(dict(loads))
        mine = swept["results"][label]
        assert mine["train"]["steps"] == one["train"]["steps"] == row["steps"]
        assert mine["train"]["loss_curve"] == one["train"]["loss_curve"]
        for key in ("explained_variance", "l0", "dead_fraction", "mse", "top_activations"):
            assert mine[key] == one[key], (label, key)
        assert row["explained_variance"] == one["explained_variance"]
        same_sae(tmp_path / "sweep" / mine["weights_path"], tmp_path / label / one["weights_path"])
        assert (tmp_path / "sweep" / mine["saelens_path"] / "cfg.json").is_file()
    # one read for training and one for the top-activating rows, whatever the number of SAEs
    assert all(sweep_loads == loads for loads in alone_loads), (sweep_loads, alone_loads)
    if "min_steps" in grid:
        assert sorted({row["steps"] for row in swept["comparison"]}) == [30, 70]
    assert not list((tmp_path / "sweep").glob("sae/checkpoints/*"))   # removed when done


def test_the_report_compares_the_settings_of_a_sweep(store, tmp_path):
    r = fit(store, tmp_path, sweep={"k": [2, 6]}, steps=30, top_latents=0)
    doc = {"store": str(store.root), "results": {"sae": {"src": r}}, "layers": store.layers()}
    text = write_report(doc, tmp_path).read_text()
    assert "Sweep on `src` (2 SAEs on one read of the rows)" in text
    for row in r["comparison"]:
        assert f"| {row['setting']} | {row['explained_variance']:.4g} | {row['l0']:.4g} |" in text
    assert r["results"]["k=2"]["l0"] < r["results"]["k=6"]["l0"]


def test_a_sweep_resumes_each_sae_from_its_own_checkpoint(store, tmp_path, monkeypatch):
    """A sweep killed at step 40 (checkpoints every 25) resumes each SAE from step 25 and ends
    with the SAEs of a sweep that never stopped; each SAE's checkpoint is the one its setting
    alone would write."""
    from mechray.analysis.sae.train import SAETrainer

    grid = {"k": [2, 4]}
    whole = fit(store, tmp_path / "whole", sweep=grid, top_latents=0)
    real = SAETrainer.step

    def dying(self, x):
        if self.n_steps == 40:
            raise RuntimeError("killed")
        return real(self, x)

    monkeypatch.setattr(SAETrainer, "step", dying)
    with pytest.raises(RuntimeError, match="killed"):
        fit(store, tmp_path / "cut", sweep=grid, top_latents=0)
    monkeypatch.setattr(SAETrainer, "step", real)
    assert len(list((tmp_path / "cut").glob("sae/checkpoints/src-*/checkpoint.json"))) == 2
    again = fit(store, tmp_path / "cut", sweep=grid, top_latents=0)
    for label in ("k=2", "k=4"):
        assert again["results"][label]["train"]["resumed_from_step"] == 25
        assert whole["results"][label]["train"]["resumed_from_step"] is None
        assert again["results"][label]["explained_variance"] == pytest.approx(
            whole["results"][label]["explained_variance"], abs=1e-6)


@pytest.mark.parametrize("sweep, match", [
    ({"seed": [0, 1]}, r"sweep over \['seed'\] is not possible.*run separate fits"),
    ({"k": []}, r"sweep\['k'\] is empty"),
    ({"k": list(range(1, 18))}, r"17 SAEs, more than 16"),
    ({"k": [4, 100]}, r"k=100 must be <= n_latents=64")])
def test_a_bad_sweep_is_refused_naming_the_value_and_the_fix(sweep, match):
    with pytest.raises(AnalysisParamsError, match=match):
        get_analysis("sae", {**PARAMS, "sweep": sweep})


def test_a_sweep_costs_and_answers_as_much_as_its_saes():
    """The API's limits see every SAE of a sweep (before: the cost of one, so a sweep of 16
    passed a limit set for one fit)."""
    from mechray.analysis.base import Workload, analysis_class
    from mechray.analysis.sae import SAEParams

    sae, w = analysis_class("sae"), Workload(rows=100_000, d=64, shard_rows=1000)
    one = [sae.cost(SAEParams(k=k), w) for k in (8, 16, 32)]
    swept = sae.cost(SAEParams(sweep={"k": [8, 16, 32]}), w)
    assert swept.ops == pytest.approx(sum(c.ops for c in one))
    assert swept.bytes == pytest.approx(sum(c.bytes for c in one))
    wide = SAEParams(sweep={"expansion_factor": [2, 4]})
    assert sae.answer_bytes(wide, w) == pytest.approx(
        sae.answer_bytes(SAEParams(expansion_factor=2), w) +
        sae.answer_bytes(SAEParams(expansion_factor=4), w))
