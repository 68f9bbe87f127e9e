"""Lightning DDP (two CPU processes, gloo) with MechIntCallback: one store, rank-named shards.

Usage::

    python examples/lightning_ddp.py                        # ./lightning_ddp_output/
    python examples/lightning_ddp.py --out /tmp/ddp --devices 2 --steps 9 --every 4

Run it as a script (not from a notebook): ``strategy='ddp'`` relaunches this file once per extra
device, and every process runs ``main()``.  No Ray is involved, so each rank writes its own
shards through writer threads, named ``activations_rank{r:03d}_shard_{i:06d}_step_{s}.pt``, and
its own ``manifest.rank{r:03d}.json``; when ``fit`` ends, rank 0 waits at a barrier and merges
them into one ``manifest.json`` (the partial files are removed).  Then rank 0 prints the store
(as ``mechray ls`` does), runs the ``neuron`` analysis over every rank's shards, and writes
``summary.json`` beside the store.  On GPUs use ``accelerator='gpu'`` (NCCL); the capture path
is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mechray import EvalMechIntRunner, MechIntCallback, MechIntConfig, ShardStore
from mechray.demo.model import NeuroFMX, spike_dataset

log = logging.getLogger("examples.lightning_ddp")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_ddp_output", help="output directory")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes (CPU)")
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps")
    parser.add_argument("--every", type=int, default=4, help="save_hidden_every_n_steps")
    parser.add_argument("--batch-size", type=int, default=8, help="per-process batch size")
    parser.add_argument("--no-analysis", action="store_true", help="capture only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(1)                  # N processes on a small CPU: one thread each

    out = Path(args.out).resolve()            # the same absolute path in every process
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.1", "popt"],
                           save_hidden_every_n_steps=args.every,
                           storage_path=str(out / "mechint_cache"),
                           use_ray=False,             # writer threads + per-rank manifests
                           analyses_to_run=["neuron"], verbose=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         callbacks=[MechIntCallback(config)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    model = NeuroFMX(n_neurons=16, d_model=32, n_blocks=2)
    data = spike_dataset(n_trials=128, n_neurons=16, seq_len=16)
    trainer.fit(model, DataLoader(data, batch_size=args.batch_size))   # DDP shards the data
    if not trainer.is_global_zero:
        return

    store = ShardStore(config.storage_path)   # one manifest.json listing every rank's shards
    shards = store.shards()
    print(f"{store.location}: {len(shards)} shard(s) from ranks "
          f"{sorted({e['rank'] for e in shards})}, steps {store.steps()}")
    for name, info in store.layers().items():
        print(f"  {name:28s} rows={info['rows']:6d} features={info['feature_shape']} "
              f"shards={info['shards']}")
    summary = {"store": str(store.root), "world_size": trainer.world_size,
               "shards": [{k: e[k] for k in ("file", "rank", "step", "rows")} for e in shards],
               "partial_manifests": sorted(p.name for p in store.root.glob("manifest.rank*"))}
    if not args.no_analysis:
        runner = EvalMechIntRunner(None, config.model_copy(update={"verbose": False}))
        results = runner.run_mechint_eval(hidden_shards_path=config.storage_path)
        report = runner.export_results(out / "results")
        summary["neuron_samples"] = {layer: r["num_samples"]
                                     for layer, r in results["neuron"].items()}
        print(f"report: {report}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("summary in %s (pid %d)", out / "summary.json", os.getpid())


if __name__ == "__main__":
    main()
