"""A 3-node Ray cluster on one machine: writers spread over nodes, shards all land."""

import pytest
import torch
from torch import nn

from mechray import ActivationSampler, ShardStore

pytestmark = pytest.mark.slow


def test_writers_spread_across_nodes(ray_three_nodes, tmp_path):
    import ray

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    sampler = ActivationSampler(layers=["0", "1"], save_dir=str(tmp_path), use_ray=True,
                                num_writers=3)
    sampler.register_hooks(model)
    for step in range(9):
        model(torch.randn(128, 16))
        sampler.save_activations(step)
    sampler.close()
    nodes = {ray.get(w.node_id.remote()) for w in sampler.transport.pool.writers}
    assert len(nodes) >= 2, f"writers all on one node: {nodes}"
    store = ShardStore(tmp_path)
    assert [e["step"] for e in store.shards()] == list(range(9))
    assert store.layers()["1"]["rows"] == 9 * 128
