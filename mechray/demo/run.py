"""``make demo`` / ``mechray demo``: train the NeuroFMX-like model with capture through Ray,
then analyse the shards with every analysis and write the report.

Usage::

    mechray demo --out demo_output --steps 200 --every 20
    mechray demo --no-analysis                   # capture only

Starts a local Ray (``address='local'``, no dashboard), trains with :class:`MechIntCallback`
writing through the Ray writer pool (plus, at every sampled step, one fixed probe batch in its own
shard with its inputs, so ``dynamics`` can compare steps on the same inputs), reports where the
shards and manifest are, then runs ``neuron``, ``feature``, ``sae``, ``causal``, ``circuit`` and
``dynamics`` with :class:`EvalMechIntRunner` (fanned out over the same Ray) and prints the path of
``demo_output/results/mechint_report.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("mechray.demo")

LAYERS = ["mamba_backbone.blocks.0", "mamba_backbone.blocks.3", "mamba_backbone.blocks.7",
          "perceiver", "popt", "heads.decoder", "heads.encoder"]
# Small enough for a few minutes on 2 CPU cores.
ANALYSIS_PARAMS = {
    # the sae's training budget, batch, lr, warmup and start all at their defaults
    "sae": {"expansion_factor": 4, "k": 8, "device": "auto"},
    "causal": {"n_inputs": 32, "top_n": 16, "max_rows": 2048},
    "circuit": {"n_inputs": 32, "check_neurons": 4, "top_k": 16},
    "feature": {"n_components": 10, "n_clusters": 6},
    "dynamics": {"n_components": 5},
}


def run_demo(out: str = "demo_output", steps: int = 200, every: int = 20, use_ray: bool = True,
             num_cpus: int = 3) -> Path:
    """Train, capture, and return the store's directory."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from mechray import MechIntCallback, MechIntConfig, ShardStore
    from mechray.demo.model import NeuroFMX, spike_dataset

    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    store_dir = Path(out) / "mechint_cache"
    config = MechIntConfig(sample_layers=LAYERS, save_hidden_every_n_steps=every,
                           storage_path=str(store_dir), max_activations_per_shard=4096,
                           analyses_to_run=["neuron", "feature", "sae", "causal", "circuit",
                                            "dynamics"], analysis_params=ANALYSIS_PARAMS,
                           save_inputs=True, use_ray=use_ray, eval_max_samples=64)
    if use_ray:
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
    loader = DataLoader(spike_dataset(n_trials=1024), batch_size=32, shuffle=True)
    probe = spike_dataset(n_trials=16, seed=1).tensors[0]
    trainer = pl.Trainer(max_steps=steps, callbacks=[MechIntCallback(config, probe_inputs=probe)],
                         accelerator="cpu",
                         devices=1, logger=pl.loggers.CSVLogger(str(Path(out) / "logs")),
                         enable_checkpointing=False, enable_model_summary=False)
    model = NeuroFMX()
    trainer.fit(model, loader)
    torch.save(model.state_dict(), Path(out) / "model.pt")
    store = ShardStore(store_dir)
    log.info("shards and manifest in %s", store.root)
    return store.root


def analyse(out: str = "demo_output") -> Path:
    """Run every analysis on the demo's shards with the trained model; returns the report path."""
    import torch

    from mechray import EvalMechIntRunner, MechIntConfig
    from mechray.demo.model import NeuroFMX

    store_dir = Path(out) / "mechint_cache"
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(store_dir),
                           analyses_to_run=["neuron", "feature", "sae", "causal", "circuit",
                                            "dynamics"], analysis_params=ANALYSIS_PARAMS,
                           eval_max_samples=64)
    torch.manual_seed(0)
    runner = EvalMechIntRunner(NeuroFMX(), config)
    runner.run_mechint_eval(checkpoint_path=str(Path(out) / "model.pt"),
                            hidden_shards_path=str(store_dir))
    return runner.export_results(Path(out) / "results")


def summarize(store_dir: Path) -> str:
    from mechray import ShardStore

    store = ShardStore(store_dir)
    lines = [f"store: {store.root}", f"manifest: {store.root / 'manifest.json'}",
             f"shards: {len(store.shards())} ({sum(e['bytes'] for e in store.shards()) / 1e6:.1f} MB)"
             f", steps {store.steps()}"]
    for name, info in store.layers().items():
        lines.append(f"  {name:28s} rows={info['rows']:7d} features={info['feature_shape']} "
                     f"dtype={info['dtype']} shards={info['shards']}")
    return "\n".join(lines)
