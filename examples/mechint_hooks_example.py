"""Every pattern of the mechint quick reference, run in order on the demo NeuroFMX model.

Usage::

    python examples/mechint_hooks_example.py                      # ./mechint_example_output/
    python examples/mechint_hooks_example.py --out /tmp/mx --steps 12 --every 4

Runs on CPU in well under a minute (tiny model, tiny data, no Ray) and writes, under ``--out``:

- Pattern 1, Lightning: ``mechint_cache/`` (shards at steps 0, every, 2*every, ... and
  ``manifest.json``) and ``model.pt``;
- Pattern 2, manual loop: ``manual_cache/``;
- Pattern 3, evaluation only: ``results/mechint_results.json``, ``results/mechint_report.md``
  and plots;
- Pattern 4, API: ``api_responses.json`` (the FastAPI routes called through ``TestClient``);
- Example 1, minimal setup: ``example1_cache/``;
- Example 2, full pipeline: ``example2_cache/`` and ``example2_results/``;
- Example 3, custom sampler: ``custom_cache/`` (one shard, step 100);

and ``summary.json`` naming every store, its shards and the result files.  The seed's layer
names (``'layer1'``, ``'layer2'``) are replaced by real module names of the demo model
(``for name, _ in model.named_modules(): print(name)`` lists them).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mechray import (
    ActivationSampler,
    EvalMechIntRunner,
    FastAPIIntegrationMixin,
    MechIntCallback,
    MechIntConfig,
    MechIntHooks,
    ShardStore,
)
from mechray.demo.model import NeuroFMX, spike_dataset

log = logging.getLogger("examples.mechint_hooks_example")
NEURONS, SEQ = 16, 16


def make_model() -> NeuroFMX:
    """The demo model at a tiny size; it keeps the seed's module names (4 Mamba blocks here)."""
    torch.manual_seed(0)
    return NeuroFMX(n_neurons=NEURONS, d_model=32, n_blocks=4)


def make_loader(trials: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(spike_dataset(n_trials=trials, n_neurons=NEURONS, seq_len=SEQ),
                      batch_size=batch_size)


def make_trainer(callbacks: list, steps: int) -> pl.Trainer:
    """``pl.Trainer(callbacks=[MechIntCallback(config)], ...)`` kept quiet for an example."""
    return pl.Trainer(callbacks=callbacks, max_steps=steps, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


def describe(path: Path) -> dict:
    """What a store holds, as ``mechray ls`` shows it."""
    store = ShardStore(path)
    return {"path": str(path), "shards": [e["file"] for e in store.shards()],
            "steps": store.steps(),
            "layers": {name: {"rows": info["rows"], "feature_shape": info["feature_shape"]}
                       for name, info in store.layers().items()}}


# --- Pattern 1: training with Lightning (easiest) -------------------------------------------------
def pattern_1_lightning(out: Path, steps: int, every: int) -> tuple[NeuroFMX, MechIntConfig]:
    config = MechIntConfig(
        sample_layers=["mamba_backbone.blocks.3", "popt"],
        save_hidden_every_n_steps=every,
        storage_path=str(out / "mechint_cache"),
    )
    model = make_model()
    trainer = make_trainer([MechIntCallback(config)], steps)
    trainer.fit(model, make_loader())
    torch.save(model.state_dict(), out / "model.pt")      # Pattern 3 reads it back
    log.info("Pattern 1: %s", describe(config.local_dir)["shards"])
    return model, config


# --- Pattern 2: manual training loop --------------------------------------------------------------
def pattern_2_manual_loop(out: Path, every: int) -> MechIntConfig:
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=every, storage_path=str(out / "manual_cache"))
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hooks = MechIntHooks(config)
    hooks.register_hooks(model)
    try:
        for step, (spikes, behaviour) in enumerate(make_loader()):
            outputs = model(spikes)                        # the hooks see this forward pass
            log_rates, pred = outputs                      # ... training code ...
            loss = F.poisson_nll_loss(log_rates, spikes, log_input=True) + \
                F.mse_loss(pred, behaviour)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % config.save_hidden_every_n_steps == 0:
                hooks.sampler.save_activations(step)
                hooks.sampler.clear_cache()
    finally:
        hooks.close()                                      # removes every hook, flushes shards
    log.info("Pattern 2: decoder output %s; %s", list(outputs[0].shape),
             describe(config.local_dir)["shards"])
    return config


# --- Pattern 3: evaluation only -------------------------------------------------------------------
def pattern_3_evaluation(out: Path, train_config: MechIntConfig) -> dict:
    config = train_config.model_copy(update={
        "analyses_to_run": ["neuron", "feature", "sae", "causal"],
        "analysis_params": {"feature": {"n_components": 4, "n_clusters": 3},
                            "sae": {"expansion_factor": 2, "k": 4, "steps": 30,
                                    "batch_size": 64},
                            "causal": {"n_inputs": 8, "top_n": 8}},
        "eval_max_samples": 16, "verbose": False})
    model = make_model()                                   # fresh weights; the checkpoint loads
    runner = EvalMechIntRunner(model, config)
    eval_inputs = spike_dataset(n_trials=16, n_neurons=NEURONS, seq_len=SEQ, seed=1).tensors[0]
    results = runner.run_mechint_eval(
        checkpoint_path=str(out / "model.pt"),
        hidden_shards_path=str(out / "mechint_cache"),
        eval_data=eval_inputs,                             # inputs for the causal analysis
    )
    report = runner.export_results(out / "results")
    popt = results["neuron"]["popt"]
    log.info("Pattern 3: popt neuron 0 mean %.4f, sparsity %.3f over %d rows; report %s",
             popt["mean"][0], popt["sparsity"][0], popt["num_samples"], report)
    return results


# --- Pattern 4: API server ------------------------------------------------------------------------
def pattern_4_api(out: Path, model: NeuroFMX, config: MechIntConfig) -> dict:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config)
    mixin.add_routes(app)
    # Endpoints: /interpret, /interpret/upload, /interpret/layers (serve it: `uvicorn app:app`)

    answers: dict = {}
    try:
        with TestClient(app) as client:                    # the same calls as the seed's curl lines
            r = client.get("/interpret/layers")
            answers["layers"] = {"status": r.status_code, "body": r.json()}
            r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "popt"})
            body = r.json()
            answers["interpret"] = {"status": r.status_code,
                                    "result_keys": sorted(body.get("result", {}))}
            buf = io.BytesIO()
            torch.save({"popt": torch.randn(64, 32)}, buf)
            r = client.post("/interpret/upload", data={"analysis_type": "feature"},
                            files={"file": ("activations.pt", buf.getvalue(),
                                            "application/octet-stream")})
            body = r.json()
            answers["upload"] = {"status": r.status_code,
                                 "layers": sorted(body.get("results", {}))}
            r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": "pop"})
            answers["unknown_layer"] = {"status": r.status_code, "body": r.json()}
    finally:
        mixin.close()
    (out / "api_responses.json").write_text(json.dumps(answers, indent=1))
    log.info("Pattern 4: layers %s, POST /interpret %d, upload %d, unknown layer %d",
             sorted(answers["layers"]["body"].get("layers", {})), answers["interpret"]["status"],
             answers["upload"]["status"], answers["unknown_layer"]["status"])
    return answers


# --- Example 1: minimal setup ---------------------------------------------------------------------
def example_1_minimal(out: Path, steps: int) -> Path:
    # The seed passes only sample_layers; storage_path keeps this run's shards under --out
    # (without it they go to ./mechint_cache).
    trainer = make_trainer(
        [MechIntCallback(config={"sample_layers": ["heads.decoder"],
                                 "storage_path": str(out / "example1_cache")})], steps)
    trainer.fit(make_model(), make_loader())
    return out / "example1_cache"


# --- Example 2: full pipeline ---------------------------------------------------------------------
def example_2_full_pipeline(out: Path, steps: int, every: int) -> dict:
    # 1. Train with hooks
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.0", "perceiver"],
                           save_hidden_every_n_steps=every,
                           storage_path=str(out / "example2_cache"),
                           analyses_to_run=["sae", "neuron"],       # the seed's default pair
                           analysis_params={"sae": {"expansion_factor": 2, "k": 4, "steps": 20,
                                                    "batch_size": 64}},
                           verbose=False)
    model = make_model()
    trainer = make_trainer([MechIntCallback(config)], steps)
    trainer.fit(model, make_loader())

    # 2. Analyze
    runner = EvalMechIntRunner(model, config)
    results = runner.run_mechint_eval(hidden_shards_path=str(out / "example2_cache"))

    # 3. Export
    runner.export_results(out / "example2_results")
    return results


# --- Example 3: custom sampler --------------------------------------------------------------------
def example_3_custom_sampler(out: Path) -> Path:
    model = make_model()
    sampler = ActivationSampler(
        layers=["perceiver"],
        save_dir=str(out / "custom_cache"),
    )
    sampler.register_hooks(model)

    # Training loop
    for batch, _ in make_loader(trials=24):
        output = model(batch)

    # Save
    sampler.save_activations(global_step=100)
    sampler.close()                                        # remove hooks, wait for the shard
    log.info("Example 3: encoder output %s", list(output[1].shape))
    return out / "custom_cache"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="mechint_example_output", help="output directory")
    parser.add_argument("--steps", type=int, default=9, help="training steps per Lightning run")
    parser.add_argument("--every", type=int, default=4, help="save_hidden_every_n_steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    model, config = pattern_1_lightning(out, args.steps, args.every)
    manual = pattern_2_manual_loop(out, args.every)
    evaluated = pattern_3_evaluation(out, config)
    answers = pattern_4_api(out, model, config)
    minimal = example_1_minimal(out, min(args.steps, 3))
    pipeline = example_2_full_pipeline(out, args.steps, args.every)
    custom = example_3_custom_sampler(out)

    summary = {
        "pattern_1": describe(config.local_dir),
        "pattern_2": describe(manual.local_dir),
        "pattern_3": {"results": str(out / "results" / "mechint_results.json"),
                      "report": str(out / "results" / "mechint_report.md"),
                      "analyses": {name: sorted(per) for name, per in evaluated.items()}},
        "pattern_4": {route: a["status"] for route, a in answers.items()},
        "example_1": describe(minimal),
        "example_2": {**describe(out / "example2_cache"),
                      "analyses": {name: sorted(per) for name, per in pipeline.items()}},
        "example_3": describe(custom),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: every pattern ran; summary in {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
