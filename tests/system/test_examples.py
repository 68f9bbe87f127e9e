"""The examples, run as a user runs them: a subprocess each, CPU, tiny sizes, a fresh directory.

Each test checks what the example produced (shard files, manifest entries, results JSON keys,
HTTP answers), not only its exit code.  ``examples/ray_train_capture.py`` is tested in
``tests/system/test_ray_cluster.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(name: str, args: list[str], cwd: Path, timeout: float = 240,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``examples/{name}`` with this interpreter in ``cwd``; fail with its output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "PYTHONUNBUFFERED": "1", "MECHRAY_CACHE_DIR": str(cwd / "mechray_cache"),
                **(env or {})}
    try:
        proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name} ran over {timeout}s; output:\n{(exc.stdout or '')[-3000:]}"
                    f"\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def seed_names(steps) -> list[str]:
    return [f"activations_shard_{i:06d}_step_{s}.pt" for i, s in enumerate(steps)]


def test_mechint_hooks_example_runs_every_seed_pattern(tmp_path):
    proc = run_example("mechint_hooks_example.py", ["--out", "out", "--steps", "9", "--every", "4"],
                       tmp_path)
    out = tmp_path / "out"
    assert "every pattern ran" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())

    # Pattern 1 (Lightning): the seed's file structure, manifest lists exactly those shards
    cache = out / "mechint_cache"
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert files == seed_names([0, 4, 8])
    doc = manifest(cache)
    assert [e["file"] for e in doc["shards"]] == files
    assert doc["config"]["sample_layers"] == ["mamba_backbone.blocks.3", "popt"]
    first = doc["shards"][0]
    assert first["rows"] == {"mamba_backbone.blocks.3": 8 * 16, "popt": 8}
    assert first["layers"]["popt"] == {"shape": [8, 32], "dtype": "float32"}
    data = torch.load(cache / files[0], weights_only=True)
    assert set(data["activations"]) == {"mamba_backbone.blocks.3", "popt"}
    assert (out / "model.pt").is_file()

    # Pattern 2 (manual loop): saves at steps 0 and 4 of 8 batches; one forward per step
    assert summary["pattern_2"]["shards"] == seed_names([0, 4])
    assert summary["pattern_2"]["layers"]["popt"]["rows"] == 8 + 4 * 8

    # Pattern 3 (evaluation): every configured analysis, per layer, with the contract's keys
    results = json.loads((out / "results" / "mechint_results.json").read_text())
    assert results["checkpoint"].endswith("model.pt")
    res = results["results"]
    assert set(res) == {"neuron", "feature", "sae", "causal"}
    popt = res["neuron"]["popt"]
    assert {"mean", "std", "max", "min", "sparsity", "num_samples"} <= set(popt)
    assert popt["num_samples"] == 24 and len(popt["mean"]) == 32
    assert len(res["feature"]["popt"]["explained_variance_ratio"]) == 4
    assert res["sae"]["popt"]["n_latents"] == 64
    assert (out / "results" / res["sae"]["popt"]["weights_path"]).is_file()
    assert res["causal"]["popt"]["ranked"][0].keys() >= {"neuron", "effect"}
    assert not any(r.get("skipped") for per in res.values() for r in per.values())
    assert (out / "results" / "mechint_report.md").read_text().startswith("# mechray")

    # Pattern 4 (API through TestClient)
    api = json.loads((out / "api_responses.json").read_text())
    assert api["layers"]["status"] == 200
    assert api["layers"]["body"]["layers"]["popt"]["shards"] == 3
    assert api["interpret"]["status"] == 200 and "sparsity" in api["interpret"]["result_keys"]
    assert api["upload"] == {"status": 200, "layers": ["popt"]}
    assert api["unknown_layer"]["status"] == 404
    assert "popt" in api["unknown_layer"]["body"]["message"]

    # Examples 1-3
    assert summary["example_1"]["shards"] == seed_names([0])
    assert set(summary["example_1"]["layers"]) == {"heads.decoder"}
    assert summary["example_2"]["analyses"] == {"sae": ["mamba_backbone.blocks.0", "perceiver"],
                                                "neuron": ["mamba_backbone.blocks.0", "perceiver"]}
    assert (out / "example2_results" / "mechint_results.json").is_file()
    assert summary["example_3"]["shards"] == ["activations_shard_000000_step_100.pt"]
    assert summary["example_3"]["layers"]["perceiver"]["rows"] == 24 * 8   # trials x latents
    assert not (tmp_path / "mechint_cache").exists()      # nothing escaped --out


def test_analyze_s3_captures_to_s3_and_analyses_from_it(tmp_path):
    run_example("analyze_s3.py", ["--local-s3", "--out", "out", "--bucket", "bkt",
                                  "--prefix", "exp/acts", "--analyses", "neuron,feature"],
                tmp_path, timeout=180)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    names = seed_names([0, 4, 8])
    assert summary["location"] == "s3://bkt/exp/acts"
    assert summary["bucket_keys"] == sorted([f"exp/acts/{n}" for n in names] +
                                            ["exp/acts/manifest.json"])
    assert [s["s3_uri"] for s in summary["shards"]] == [f"s3://bkt/exp/acts/{n}" for n in names]
    assert summary["spool_left"] == []                     # uploaded shards leave the spool
    assert summary["downloaded"] == names                  # read back through the S3 cache
    results = json.loads((out / "results" / "mechint_results.json").read_text())
    assert results["store"] == "s3://bkt/exp/acts"
    assert set(results["results"]) == {"neuron", "feature"}
    assert results["results"]["neuron"]["popt"]["num_samples"] == 24
    assert results["layers"]["mamba_backbone.blocks.1"]["shards"] == 3


@pytest.mark.slow
def test_lightning_ddp_two_ranks_one_manifest(tmp_path):
    run_example("lightning_ddp.py", ["--out", "out", "--devices", "2", "--steps", "9",
                                     "--every", "4"], tmp_path, timeout=240)
    cache = tmp_path / "out" / "mechint_cache"
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert files == sorted(f"activations_rank{r:03d}_shard_{i:06d}_step_{s}.pt"
                           for r in (0, 1) for i, s in enumerate([0, 4, 8]))
    assert not list(cache.glob("manifest.rank*.json"))     # rank 0 merged and removed them
    doc = manifest(cache)
    assert sorted(e["file"] for e in doc["shards"]) == files
    assert {e["world_size"] for e in doc["shards"]} == {2}
    assert all(e["rows"] == {"mamba_backbone.blocks.1": 8 * 16, "popt": 8} for e in doc["shards"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["neuron_samples"] == {"mamba_backbone.blocks.1": 6 * 128, "popt": 6 * 8}


@pytest.mark.slow
def test_serve_app_smoke_with_token(tmp_path):
    run_example("serve_app.py", ["--smoke", "--port", "0", "--out", "out"], tmp_path,
                timeout=240, env={"MECHRAY_API_TOKEN": "example-token"})
    smoke = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert smoke["base"].startswith("http://127.0.0.1:")
    assert smoke["health"]["status"] == "ok" and smoke["health"]["store_ready"] is True
    assert smoke["layers_without_token"] == 401
    layers = smoke["layers"]["body"]["layers"]
    assert smoke["layers"]["status"] == 200
    assert set(layers) == {"mamba_backbone.blocks.1", "popt"}
    assert layers["popt"] == {"feature_shape": [32], "dtype": "float32", "shards": 3, "rows": 24,
                              "steps": [0, 1, 2], "steps_total": 3}
    assert smoke["interpret"]["status"] == 200 and smoke["interpret"]["num_samples"] == 24
    assert "sparsity" in smoke["interpret"]["result_keys"]


@pytest.mark.slow
def test_transformers_text_example_masks_padding_and_shows_token_contexts(tmp_path):
    """MiniLM (pretrained, offline) over three dozen padded sentences: only real tokens are
    stored, causal and circuit run on the tokenizer's output, the report shows text."""
    proc = run_example("transformers_text.py", ["--out", "out", "--sentences", "36",
                                                "--eval-sentences", "12", "--fast",
                                                "--circuit"], tmp_path, timeout=600)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["padded_positions"] > summary["real_tokens"]           # there was padding
    assert summary["rows_stored"] == {"encoder.layer.3": summary["real_tokens"]}
    assert summary["skipped"] == {n: {} for n in ("neuron", "feature", "sae", "causal",
                                                  "circuit")}
    assert len(summary["top_contexts"]) == 5 and all("[[" in t for t in summary["top_contexts"])
    # distinct sentences, special tokens left out of capture: no [CLS] rows, no repeated context
    assert len(set(summary["top_contexts"])) == 5, summary["top_contexts"]
    assert not any("[[[CLS]]]" in t or "[[[SEP]]]" in t for t in summary["top_contexts"])
    results = json.loads((tmp_path / "out" / "results" / "mechint_results.json").read_text())
    causal = results["results"]["causal"]["encoder.layer.3"]
    circuit = results["results"]["circuit"]["encoder.layer.3"]
    assert causal["masked"] and causal["prefix_reused"] and len(causal["ranked"]) == 4
    assert circuit["masked"] and 0 < circuit["layer_effect"] < 1   # the layer matters, partly
    assert set(circuit["paths"]) == {"encoder.layer.5"}
    assert results["eval_inputs"]["attention_mask"][0] == 12
    report = (tmp_path / "out" / "results" / "mechint_report.md").read_text()
    assert "Top token contexts, `encoder.layer.3` (neuron `top_k`)" in report
    assert "Top token contexts, `encoder.layer.3` (sae `top_activations`)" in report
    sae_top = results["results"]["sae"]["encoder.layer.3"]["top_activations"]
    assert any(c and c["token"] for unit in sae_top["contexts"] for c in unit)
    assert "top contexts:" in proc.stdout


@pytest.mark.slow
def test_causal_lm_example_trains_left_padded_and_runs_every_analysis(tmp_path):
    """GPT-2-style model, Lightning + MechIntCallback, left padding, prompt pairs: nothing is
    skipped, contexts and logit lens come out, the circuit grid has one entry per position."""
    proc = run_example("causal_lm.py", ["--out", "out", "--steps", "12", "--fast"], tmp_path,
                       timeout=900)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {n: {} for n in ("neuron", "feature", "sae", "causal",
                                                  "circuit")}
    assert summary["top_contexts"] and all("[[" in t for t in summary["top_contexts"])
    assert len(summary["logit_lens_first"]["promoted"]) == 8
    assert summary["circuit_layer_effect"] == pytest.approx(1.0, abs=1e-4)
    grid = summary["circuit_positions"]
    assert grid and all(v == 0.0 for v in grid[:-6])     # identical tokens before the swap
    report = (tmp_path / "out" / "results" / "mechint_report.md").read_text()
    assert "Logit lens, `model.transformer.h.1`" in report
    assert '"circuit_positions"' in proc.stdout
    top = summary["heads_top"]                   # 2 blocks x 4 heads, largest effect first
    assert len(top) == 5 and [r["effect"] for r in top] == sorted((r["effect"] for r in top),
                                                                   reverse=True)
    assert all(r["layer"].endswith(".attn:heads") and 0 <= r["head"] < 4 for r in top)
    attention = summary["top_head_attention_last_token"]
    assert sum(attention) == pytest.approx(1.0, abs=1e-2)
