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
    # writer i on the i-th alive node: Ray honours the soft affinity only for actors with a
    # non-empty resource request (an empty one goes to a random node, 1 run in 3 under load)
    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    placed = [ray.get(w.node_id.remote()) for w in sampler.transport.pool.writers]
    assert placed == alive, f"writers on {placed}, meant for {alive}"
    store = ShardStore(tmp_path)
    assert [e["step"] for e in store.shards()] == list(range(9))
    assert store.layers()["1"]["rows"] == 9 * 128


def test_a_node_removed_during_capture_loses_no_shard(ray_three_nodes, tmp_path):
    import threading
    import time

    import ray

    cluster, workers = ray_three_nodes
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU())
    sampler = ActivationSampler(layers=["0", "1"], save_dir=str(tmp_path), use_ray=True,
                                num_writers=3, max_shards_in_flight=6)
    sampler.register_hooks(model)
    pool = sampler.transport.pool
    on_victim = [w for w in pool.writers
                 if ray.get(w.node_id.remote()) == workers[0].node_id]
    timer = threading.Timer(0.5, lambda: cluster.remove_node(workers[0], allow_graceful=False))
    timer.start()
    names = []
    for step in range(40):
        model(torch.randn(512, 16))
        names.append(sampler.save_activations(step))
    timer.join()
    sampler.close()
    assert workers[0] not in cluster.list_all_nodes()
    store = ShardStore(tmp_path)
    assert [e["file"] for e in store.shards()] == names  # each shard once, none lost
    for entry in store.shards():
        store.load(entry)
    # writers that lived on the removed node are restarted elsewhere and still answer (their old
    # processes may serve a call or two until they notice their raylet is gone)
    deadline = time.monotonic() + 60
    while any(ray.get(w.node_id.remote()) == workers[0].node_id for w in on_victim):
        assert time.monotonic() < deadline, "a writer never left the removed node"
        time.sleep(0.5)


def _store(path, shards=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
    with ActivationSampler(layers=["1"], save_dir=str(path), use_ray=False).attach(model) as s:
        for step in range(shards):
            model(torch.randn(2000, 16))
            s.save_activations(step)
    return path


def test_analysis_spreads_and_survives_a_node_removed_midway(ray_three_nodes, tmp_path):
    import threading
    import time

    import ray

    from mechray.analysis.engine import Engine

    cluster, workers = ray_three_nodes
    store = _store(tmp_path / "cache", shards=24)
    expected = Engine(store, use_ray=False, progress=False).run(["neuron", "feature"],
                                                               params={"feature": {"n_clusters": 2}})

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def where():
        time.sleep(0.5)
        return ray.get_runtime_context().get_node_id()

    nodes = set(ray.get([where.remote() for _ in range(6)]))
    assert len(nodes) >= 2  # the cluster really runs tasks on several nodes

    victim = workers[-1]  # workers[0] was removed by the capture test above
    timer = threading.Timer(1.0, lambda: cluster.remove_node(victim, allow_graceful=False))
    timer.start()
    try:
        got = Engine(store, use_ray=True, progress=False).run(["neuron", "feature"],
                                                              params={"feature": {"n_clusters": 2}})
    finally:
        timer.join()
    assert victim not in cluster.list_all_nodes()
    assert got["neuron"]["1"]["mean"] == expected["neuron"]["1"]["mean"]
    assert got["neuron"]["1"]["num_samples"] == expected["neuron"]["1"]["num_samples"] == 24 * 2000
    assert got["feature"]["1"]["explained_variance_ratio"] == pytest.approx(
        expected["feature"]["1"]["explained_variance_ratio"], rel=1e-9)
