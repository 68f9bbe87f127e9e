"""``make demo`` / ``mechray demo``: train the NeuroFMX-like model with capture through Ray.

Usage::

    mechray demo --out demo_output --steps 200 --every 20
    python -m mechray.demo.run

Starts a local Ray (``address='local'``, no dashboard), trains with :class:`MechIntCallback`
writing through the Ray writer pool, then reports where the shards and manifest are and what
they hold.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("mechray.demo")

LAYERS = ["mamba_backbone.blocks.0", "mamba_backbone.blocks.3", "mamba_backbone.blocks.7",
          "perceiver", "popt", "heads.decoder", "heads.encoder"]


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
                                            "dynamics"],
                           save_inputs=True, use_ray=use_ray)
    if use_ray:
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
    loader = DataLoader(spike_dataset(n_trials=1024), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, callbacks=[MechIntCallback(config)], accelerator="cpu",
                         devices=1, logger=pl.loggers.CSVLogger(str(Path(out) / "logs")),
                         enable_checkpointing=False, enable_model_summary=False)
    model = NeuroFMX()
    trainer.fit(model, loader)
    torch.save(model.state_dict(), Path(out) / "model.pt")
    store = ShardStore(store_dir)
    log.info("shards and manifest in %s", store.root)
    return store.root


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mechray demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="write with threads, not Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = run_demo(args.out, args.steps, args.every, use_ray=not args.no_ray)
    print(summarize(root))


if __name__ == "__main__":
    main()
