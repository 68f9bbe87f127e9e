"""Capture shards in a loop until killed (for the SIGKILL test).

Usage: python tests/scripts/capture_forever.py OUT_DIR
"""

import sys

import torch
from torch import nn

from mechray import ActivationSampler

model = nn.Sequential(nn.Linear(64, 512), nn.ReLU())
sampler = ActivationSampler(layers=["0", "1"], save_dir=sys.argv[1], use_ray=False,
                            num_writers=2, max_shards_in_flight=4, verbose=False)
sampler.register_hooks(model)
step = 0
while True:
    model(torch.randn(2048, 64))
    sampler.save_activations(step)
    step += 1
