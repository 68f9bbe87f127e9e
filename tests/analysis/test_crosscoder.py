"""The ``crosscoder`` analysis on planted training runs: stores whose active dictionary changes at
known steps (``planted_steps``), written through a real :class:`ActivationSampler`.

The acceptance tests run at defaults except the steps used, ``k`` and ``expansion_factor``.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from planted_steps import BIRTH, DEATH, DYING, LATE, STEPS, score, write_planted

from mechray import FastAPIIntegrationMixin, MechIntConfig
from mechray.analysis import Context, get_analysis
from mechray.analysis.base import AnalysisParamsError, Workload
from mechray.analysis.crosscoder_model import encode_raw, load_crosscoder
from mechray.analysis.engine import Engine
from mechray.analysis.lifetimes import lifetimes
from mechray.analysis.report import write_report
from mechray.analysis.sae.model import load_sae, load_saelens
from mechray.analysis.tracking import track
from mechray.api.cost import answer_bytes, estimate
from mechray.storage.reader import ShardStore
from mechray.testing import serve_in_thread


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("planted_paired")
    return write_planted(path / "store", paired=True), path


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("planted_unpaired")
    return write_planted(path / "store", paired=False), path


def events(result, tensors):
    """(step, the latent's decoder slices where it is alive) of every birth and death."""
    w = tensors["W_dec"]
    alive = torch.as_tensor(result["relative_strength"]) >= 0.3
    births = [(b, w[i, alive[i]]) for i, b in enumerate(result["birth_step"]) if b is not None]
    deaths = [(d, w[i, alive[i]]) for i, d in enumerate(result["death_step"]) if d is not None]
    return births, deaths


def check_planted(result, out_dir):
    tensors, config = load_crosscoder(out_dir / result["weights_path"])
    births, deaths = events(result, tensors)
    b, d = score(births, LATE, BIRTH), score(deaths, DYING, DEATH)
    assert b["found"] == LATE and max(b["errors"]) <= 1, (b, result["births_per_step"])
    assert b["false"] <= 0.05 * len(births), b
    assert d["found"] == DYING and d["false"] <= 0.05 * len(deaths), d
    assert result["steps"] == STEPS and isinstance(result["converged"], bool)
    assert result["explained_variance"] > 0.9
    return tensors, config


def test_paired_crosscoder_dates_the_planted_births_and_deaths(paired):
    store, path = paired
    out = path / "out"
    r = get_analysis("crosscoder", {"k": 3, "expansion_factor": 2}).fit(
        Context(store=store, out_dir=out), "src")
    assert r["pairing"] == "same_inputs" and r["paired_inputs"] == 1500
    tensors, config = check_planted(r, out)
    assert config["mode"] == "paired" and tensors["W_dec"].shape == (48, len(STEPS), 24)
    # the saved weights act on raw rows: one input's rows at every step -> the same codes
    x = torch.stack([rows for _, rows in store.iter_layer("src")], 1)[:256].float()
    z = encode_raw(tensors, config, x)
    x_hat = torch.einsum("rn,ngd->rgd", z, tensors["W_dec"]) + tensors["b_dec"]
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.9 and (z > 0).sum(1).float().mean() <= 3
    sae, cfg = load_saelens(out / r["saelens_path"])   # SAELens layout over concatenated steps
    assert sae.d_in == 24 * len(STEPS) and cfg["metadata"]["hook_name"] == "src"
    torch.testing.assert_close(sae.encode(x.reshape(len(x), -1)), z, atol=1e-4, rtol=1e-4)
    late = r["top_activations"]
    assert late["latents"] == r["born_late"][:8] and all(
        s >= BIRTH for steps in late["step"] for s in steps)


def test_unpaired_crosscoder_dates_the_planted_births_and_deaths(unpaired):
    store, path = unpaired
    out = path / "out"
    r = get_analysis("crosscoder", {"k": 3, "expansion_factor": 4}).fit(
        Context(store=store, out_dir=out), "src")
    assert r["pairing"] == "unpaired" and r["paired_inputs"] is None
    assert any("probe_inputs" in w for w in r["warnings"])
    tensors, config = check_planted(r, out)
    assert config["mode"] == "unpaired" and r["saelens_path"] is None
    write_report({"results": {"crosscoder": {"src": r}}, "layers": {}}, path)
    report = (path / "mechint_report.md").read_text()
    assert "## crosscoder" in report and "![crosscoder](crosscoder_timeline.png)" in report
    assert "births per step {'400': " in report
    assert (path / "crosscoder_timeline.png").stat().st_size > 2000


def test_lifetimes_need_clean_absence_before_a_birth():
    strength = np.asarray([[0.0, 0.01, 1.0, 0.9],     # born at 20
                           [1.0, 0.9, 0.02, 0.0],     # died at 20
                           [0.2, 0.15, 1.0, 1.0],     # never absent before: unstable, no birth
                           [1.0, 0.0, 1.0, 1.0],      # gap: intermittent
                           [1.0, 0.8, 0.7, 0.9],      # shared
                           [0.0, 1.0, 0.0, 0.0]])     # transient, but rare
    live = np.asarray([True] * 5 + [False])
    life = lifetimes(strength, [0, 10, 20, 30], live, 0.3, 0.1)
    assert life["kind"] == ["born", "died", "unstable", "intermittent", "shared", "rare"]
    assert life["birth_step"] == [20, None, None, None, None, None]
    assert life["death_step"] == [None, 20, None, None, None, None]
    assert life["peak_step"][:2] == [20, 0] and life["born_late"] == [0]


def test_bad_steps_and_sizes_are_named(paired):
    store, _ = paired
    with pytest.raises(AnalysisParamsError, match=r"training_steps \[150\].*saved steps are"):
        get_analysis("crosscoder", {"training_steps": [0, 150]}).fit(Context(store=store), "src")
    with pytest.raises(AnalysisParamsError, match="k=64 exceeds n_latents=24"):
        get_analysis("crosscoder", {"k": 64, "expansion_factor": 1}).fit(
            Context(store=store), "src")
    with pytest.raises(AnalysisParamsError, match="step_groups"):
        get_analysis("crosscoder", {"step_groups": 1})


def test_step_groups_and_training_steps_choose_the_steps(paired):
    store, _ = paired
    r = get_analysis("crosscoder", {"k": 3, "expansion_factor": 2, "steps": 60,
                                    "training_steps": [0, 100, 400, 500, 600, 700],
                                    "step_groups": 3}).fit(Context(store=store), "src")
    assert r["groups"] == [[0, 100], [400, 500], [600, 700]] and r["steps"] == [0, 400, 600]
    assert r["train"]["steps"] == 60 and any("only 60 optimizer steps" in w
                                              for w in r["warnings"])


def test_cost_and_answer_grow_with_steps():
    p = get_analysis("crosscoder", {"k": 8}).params.model_dump()
    small, big = Workload(10000, 64, 1000, steps=2), Workload(10000, 64, 1000, steps=8)
    assert estimate("crosscoder", p, big).ops > 3 * estimate("crosscoder", p, small).ops
    assert answer_bytes("crosscoder", p, big) > answer_bytes("crosscoder", p, small)


@pytest.mark.slow
def test_ray_fit_per_layer_and_http_interpret(paired, ray_local, tmp_path):
    store, path = paired
    params = {"k": 3, "expansion_factor": 2, "steps": 40}
    res = Engine(ShardStore(path / "store"), use_ray=True, progress=False,
                 out_dir=tmp_path).run(["crosscoder"], {"crosscoder": params})
    r = res["crosscoder"]["src"]
    assert not r.get("skipped"), r
    assert (tmp_path / r["weights_path"]).is_file()        # shipped back from the Ray task
    cfg = MechIntConfig(sample_layers=["src"], storage_path=str(path / "store"), verbose=False)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(None, cfg)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            ok = httpx.post(f"{url}/interpret", json={"analysis_type": "crosscoder",
                                                      "layer_name": "src", "params": params},
                            timeout=300)
            assert ok.status_code == 202, ok.text     # a fit runs as a job
            job = ok.json()
            for _ in range(600):
                done = httpx.get(f"{url}{job['poll']}", timeout=60).json()
                if done["status"] not in ("queued", "running"):
                    break
                time.sleep(0.2)
    finally:
        mixin.close()
    assert done["status"] == "done", done
    got = done["result"]["result"]
    assert got["steps"] == STEPS and got["pairing"] == "same_inputs"


# --- sae_tracking -----------------------------------------------------------------------------
def test_track_links_births_deaths_splits_merges_and_flickers():
    e = np.eye(6)

    def unit(v):
        return v / np.linalg.norm(v)

    dirs = [np.stack([e[0], e[1], e[3], e[4]]),
            np.stack([e[0], e[1], e[2], unit(e[1] + 0.2 * e[5]), e[3], e[4],
                      unit(e[0] + 0.3 * e[5])]),        # c born; b and a split
            np.stack([e[0], e[2], e[3], e[5], e[5]]),   # b, e4 die; a' merges back into a
            np.stack([e[0], e[2], e[3], e[4], unit(e[3] + 0.1 * e[4])])]
    live = [np.ones(len(d), bool) for d in dirs]
    live[2][4] = False                                  # not live: never matched
    freqs = [np.full(len(d), 0.1) for d in dirs]
    r = track(dirs, live, freqs, [0, 10, 20, 30], 0.7)
    assert [(b["step"], b["latent"]) for b in r["births"]] == [(10, 2)]
    assert [(d["step"], d["latent"]) for d in r["deaths"]] == [(20, 1), (20, 5)]
    assert [(s["step"], s["from"], s["into"]) for s in r["splits"]] == \
        [(10, 1, 3), (10, 0, 6), (30, 2, 4)]
    assert [(m["step"], m["from"], m["into"]) for m in r["merges"]] == [(20, 6, 0)]
    assert [(f["step"], f["latent"]) for f in r["flickers"]] == \
        [(10, 3), (10, 6), (20, 3), (30, 3), (30, 4)]
    c = r["births"][0]["chain"]
    assert r["chains"][c] == [[1, 2], [2, 1], [3, 1]] and r["kind"][c] == "born"
    assert r["kind"][0] == "shared" and r["chains"][0] == [[g, 0] for g in range(4)]
    assert r["birth_step"][c] == 10 and r["death_step"][1] == 20 and r["kind"][1] == "died"


@pytest.mark.slow
def test_tracking_finds_the_planted_births_and_deaths(unpaired, tmp_path):
    store, _ = unpaired
    steps = [0, 200, 300, 400, 500, 700]
    r = get_analysis("sae_tracking", {"k": 3, "expansion_factor": 2, "training_steps": steps}
                     ).fit(Context(store=store, out_dir=tmp_path), "src")
    assert r["steps"] == steps and len(r["weights_paths"]) == len(steps)
    w = {s: load_sae(tmp_path / p).W_dec for s, p in zip(steps, r["weights_paths"])}
    births = [(e["step"], w[e["step"]][e["latent"]][None]) for e in r["births"]]
    deaths = [(e["step"], w[steps[steps.index(e["step"]) - 1]][e["latent"]][None])
              for e in r["deaths"]]
    b, d = score(births, LATE, BIRTH), score(deaths, DYING, DEATH)
    assert b["found"] == LATE and max(b["errors"]) <= 1 and b["false"] <= 0.05 * len(births)
    assert d["found"] == DYING and d["false"] <= 0.05 * len(deaths)
    assert {e["step"] for e in r["births"]} == {BIRTH}     # the crosscoder's birth step too
