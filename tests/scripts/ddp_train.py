"""Lightning DDP on CPU (gloo) with MechIntCallback; run as a script so Lightning can relaunch it.

Usage: python tests/scripts/ddp_train.py OUT_DIR [--devices 2] [--steps 9] [--every 4]
"""

import argparse
import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mechray import MechIntCallback, MechIntConfig
from mechray.demo.model import NeuroFMX


class RankData(TensorDataset):
    """Each sample's spikes are filled with its index so shards reveal which batch a rank saw."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n = 256
    spikes = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 8, 16).contiguous()
    data = RankData(spikes, torch.zeros(n, 8, 2))
    config = MechIntConfig(sample_layers=["embed", "popt"], save_hidden_every_n_steps=args.every,
                           storage_path=os.path.join(args.out, "cache"), save_inputs=True,
                           use_ray=False)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[MechIntCallback(config)],
                         use_distributed_sampler=True)
    trainer.fit(NeuroFMX(n_neurons=16, d_model=16, n_blocks=2),
                DataLoader(data, batch_size=4, shuffle=False))


if __name__ == "__main__":
    main()
