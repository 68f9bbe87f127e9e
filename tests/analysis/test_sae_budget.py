"""The SAE budget on stored rows: the cap in epochs, the held-out early stop, and the warnings
for a memorised or too-small store (issue 22, item 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mechray.analysis import Context, get_analysis
from mechray.analysis.sae.analysis import SAEParams
from mechray.analysis.sae.budget import budget_rule, budget_steps, sae_warnings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sae import write_store  # noqa: E402

SMALL = {"n_latents": 1024, "k": 4, "batch_size": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def memorable(tmp_path_factory):
    """400 rows of isotropic noise in d 32: no features to find, so 1,024 latents can only
    learn the rows themselves (380 training rows, fewer than the latents)."""
    torch.set_num_threads(1)
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    return write_store(tmp_path_factory.mktemp("memorable"), x)


def test_the_budget_caps_epochs_over_a_small_store():
    p = SAEParams()
    # MiniLM's case: 5,340 rows (6 steps of 1,024), 3,072 latents: the floor 6,144 steps would
    # be 1,024 epochs; the cap gives 50
    assert budget_steps(p, 6, 3072) == 300
    assert budget_rule(p, 6, 300, 3072).startswith("max_epochs=50 x 6 steps")
    assert budget_steps(p.model_copy(update={"max_epochs": None}), 6, 3072) == 6144
    assert budget_steps(p.model_copy(update={"max_epochs": 2000}), 6, 3072) == 6144
    # a store big enough that the floor is under 50 epochs is not capped
    assert budget_steps(p, 41, 1024) == 2048
    assert budget_rule(p, 41, 2048, 1024).startswith("min_steps=2048")
    # given steps or epochs are run as given
    assert budget_steps(p.model_copy(update={"epochs": 200}), 6, 3072) == 1200
    assert budget_steps(p.model_copy(update={"steps": 5000}), 6, 3072) == 5000


def test_a_memorised_store_is_named_in_the_warnings(memorable):
    """Run long without the early stop, the SAE fits the training rows (EV ~1) and not the
    held-out ones; the result says so, with the fix."""
    r = get_analysis("sae", {**SMALL, "steps": 400}).fit(Context(store=memorable), "src")
    assert r["train"]["early_stop"] is None         # given steps: run in full
    assert r["train"]["steps"] == 400
    assert r["train_explained_variance"] - r["explained_variance"] > 0.3, r
    text = " | ".join(r["warnings"])
    assert "memorising: explained variance" in text and "on held-out rows" in text, text
    assert "small store: 380 training rows for 1024 latents" in text, text
    assert "lower expansion_factor to 11 (n_latents 352) or less" in text, text
    json.dumps(r, allow_nan=False)


def test_the_held_out_loss_stops_training_and_keeps_the_best_weights(memorable):
    """The automatic budget (here 800 steps) stops when the held-out FVU rises, and the
    result carries the weights of the best evaluation: its held-out EV is the best seen."""
    r = get_analysis("sae", {**SMALL, "max_epochs": 400, "min_steps": 800}).fit(
        Context(store=memorable), "src")
    stop = r["train"]["early_stop"]
    assert r["train"]["budget"].startswith("min_steps=800")
    assert stop["stopped_at"] is not None and r["train"]["steps"] == stop["stopped_at"] < 800
    assert stop["stopped_at"] >= 200                # never before the 200-step floor
    assert "held-out FVU" in stop["reason"]
    curve = stop["heldout_fvu_curve"]
    assert stop["best_heldout_fvu"] == min(v for _, v in curve)
    assert curve[-1][1] > stop["best_heldout_fvu"]     # it got worse, and that was undone
    assert r["explained_variance"] == pytest.approx(1 - stop["best_heldout_fvu"], abs=1e-5)
    forced = get_analysis("sae", {**SMALL, "max_epochs": 400, "min_steps": 800,
                                      "early_stop": False}).fit(
        Context(store=memorable), "src")
    assert forced["train"]["steps"] == 800
    assert r["explained_variance"] > forced["explained_variance"] + 0.2
    assert r["converged"] is True


def test_warnings_on_a_pretrained_sae_speak_of_the_sae_not_of_training():
    p = SAEParams()
    data = type("D", (), {"n_train": 10_000, "n_available": 10_000, "d": 8})()
    r = {"explained_variance": 0.3, "dead_fraction": 0.5, "trained": False, "train": None,
         "n_latents": 64, "d_in": 8}
    text = " | ".join(sae_warnings(r, p, data))
    assert "this pretrained SAE misses most" in text and "pretrained SAE's latents" in text
    assert "train" not in text.replace("pretrained", ""), text
    r["explained_variance"] = -0.2
    text = " | ".join(sae_warnings(r, p, data))
    assert "negative" in text and "min_steps" not in text and "hook_name" in text
