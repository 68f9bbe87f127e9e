"""Capture activations from every Ray Train worker into one store with one manifest.

Usage::

    python examples/ray_train_capture.py --out /tmp/mechray_ray_train --workers 2 --steps 12

On a cluster, run it with ``ray job submit`` (or the RayJob in deploy/) and point ``--out`` at an
S3 prefix with ``--s3-bucket``; locally it starts its own Ray.  The driver creates the writer
pool (``start_writer_pool``); each worker's ``MechIntCallback`` finds it by name.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

log = logging.getLogger("examples.ray_train_capture")


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker: Lightning with Ray's DDP strategy and mechray's callback."""
    import pytorch_lightning as pl
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
    from torch.utils.data import DataLoader

    from mechray import MechIntCallback
    from mechray.demo.model import NeuroFMX, spike_dataset

    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = pl.Trainer(max_steps=cfg["steps"], accelerator="cpu", devices="auto",
                         strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                         callbacks=[MechIntCallback(cfg["mechint"])], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer = prepare_trainer(trainer)
    trainer.fit(NeuroFMX(n_neurons=32, d_model=32, n_blocks=2),
                DataLoader(spike_dataset(n_trials=256), batch_size=8))


def run(out: str, workers: int = 2, steps: int = 12, every: int = 4,
        s3_bucket: str | None = None, s3_endpoint_url: str | None = None) -> dict:
    from mechray import MechIntConfig, start_writer_pool

    mechint = MechIntConfig(sample_layers=["mamba_backbone.blocks.1", "popt"],
                            save_hidden_every_n_steps=every,
                            storage_path=str(Path(out, "mechint_cache").resolve()),
                            storage_backend="both" if s3_bucket else "local",
                            s3_bucket=s3_bucket, s3_prefix="ray-train",
                            s3_endpoint_url=s3_endpoint_url, use_ray=True).to_dict()
    start_writer_pool(mechint)   # the driver owns the writer actors for the whole job
    trainer = TorchTrainer(train_loop,
                           train_loop_config={"steps": steps, "mechint": mechint},
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=str(Path(out, "ray_results").resolve()),
                                                name="mechray_capture"))
    trainer.fit()
    return mechint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ray_train_output")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--s3-bucket")
    parser.add_argument("--s3-endpoint-url")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):   # on a cluster (ray job submit, RayJob)
            ray.init()
        else:                                # a local Ray just for this run
            ray.init(address="local", num_cpus=args.workers + 1, include_dashboard=False)
    config = run(args.out, args.workers, args.steps, args.every, args.s3_bucket,
                 args.s3_endpoint_url)
    from mechray import ShardStore

    store = ShardStore(config["storage_path"])
    log.info("%d shards from ranks %s in %s", len(store.shards()),
             sorted({e["rank"] for e in store.shards()}), store.root)


if __name__ == "__main__":
    main()
