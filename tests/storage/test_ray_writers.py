"""The Ray writer pool: same shards as the in-process writer, bounded, restartable, idempotent."""

import hashlib
import random
import threading
import time

import torch
from torch import nn

from mechray import ActivationSampler, ShardStore
from mechray.storage.writer_pool import WriterPool


class Wide(nn.Module):
    def __init__(self, d_in=64, d=256):
        super().__init__()
        self.lin = nn.Linear(d_in, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x))


def _capture(path, steps, rows=64, seed=0, **fields):
    torch.manual_seed(seed)
    model = Wide()
    sampler = ActivationSampler(layers=["lin", "act"], save_dir=str(path), **fields)
    sampler.register_hooks(model)
    names = []
    for step in steps:
        model(torch.randn(rows, 64))
        names.append(sampler.save_activations(step))
    return sampler, names


def _tensor_bytes(store):
    out = {}
    for entry in store.shards():
        acts = store.load(entry)["activations"]
        out[entry["file"]] = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).hexdigest()
                              for k, v in acts.items()}
    return out


def test_ray_pool_and_threads_write_the_same_shards(ray_local, tmp_path):
    s1, names = _capture(tmp_path / "ray", range(0, 50, 10), use_ray=True)
    s1.close()
    s2, names2 = _capture(tmp_path / "threads", range(0, 50, 10), use_ray=False)
    s2.close()
    assert names == names2
    a, b = ShardStore(tmp_path / "ray"), ShardStore(tmp_path / "threads")
    assert [e["file"] for e in a.shards()] == names
    assert _tensor_bytes(a) == _tensor_bytes(b)
    def strip(entries):
        return [{k: v for k, v in e.items() if k not in ("written_at", "checksum", "bytes", "run_id")}
                for e in entries]

    assert strip(a.shards()) == strip(b.shards())


def test_pool_actors_are_named_and_shared(ray_local, tmp_path):
    s1, _ = _capture(tmp_path, [0], use_ray=True)
    s1.flush()
    pool_a = s1.transport.pool
    # a second sampler of the same run (a Ray Train rank, say) shares the pool and the claim
    s2 = ActivationSampler(layers=["lin"], save_dir=str(tmp_path), use_ray=True, run_id=s1.run_id)
    pool_b = s2.transport.pool
    assert [w._actor_id for w in pool_a.writers] == [w._actor_id for w in pool_b.writers]
    assert pool_a.manifest._actor_id == pool_b.manifest._actor_id
    assert s2.next_index == 1  # continues after the shard already in the store
    s1.close()
    s2.close()


def test_in_flight_is_bounded(ray_local, tmp_path):
    sampler, names = _capture(tmp_path, range(12), rows=256, use_ray=True,
                              max_shards_in_flight=2, num_writers=1)
    sampler.close()
    assert sampler.stats.peak_in_flight <= 2
    assert sampler.stats.shards_written == 12
    assert len(ShardStore(tmp_path).shards()) == 12


def test_killed_writer_loses_and_duplicates_nothing(ray_local, tmp_path):
    import ray

    torch.manual_seed(0)
    model = Wide(d=512)
    sampler = ActivationSampler(layers=["lin", "act"], save_dir=str(tmp_path), use_ray=True,
                                num_writers=2, max_shards_in_flight=6)
    sampler.register_hooks(model)
    pool: WriterPool = sampler.transport.pool
    stop, kills = threading.Event(), []

    def killer():
        rng = random.Random(0)
        while not stop.is_set() and len(kills) < 4:
            time.sleep(rng.uniform(0.05, 0.3))
            victim = rng.randrange(len(pool.writers))
            ray.kill(pool.writers[victim], no_restart=False)
            kills.append(victim)

    thread = threading.Thread(target=killer)
    thread.start()
    names = []
    for step in range(30):
        model(torch.randn(1024, 64))
        names.append(sampler.save_activations(step))
    stop.set()
    thread.join()
    sampler.close()
    assert kills, "no writer was killed"

    store = ShardStore(tmp_path)
    listed = [e["file"] for e in store.shards()]
    assert listed == names                                   # every shard, once, in order
    assert sorted(p.name for p in tmp_path.glob("activations_*.pt")) == sorted(names)
    for entry in store.shards():                             # each loads and matches its checksum
        payload = store.load(entry)
        assert payload["activations"]["lin"].shape == (1024, 512)
    # the actors came back and still serve
    assert all(ray.get(w.node_id.remote()) for w in pool.writers)


def test_lightning_fit_through_the_ray_pool(ray_local, tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from mechray import MechIntCallback, MechIntConfig
    from mechray.demo.model import NeuroFMX, spike_dataset
    from mechray.storage.transport import RayTransport

    monkeypatch.chdir(tmp_path)
    callback = MechIntCallback(MechIntConfig(sample_layers=["mamba_backbone.blocks.1", "popt"],
                                             save_hidden_every_n_steps=3))
    trainer = pl.Trainer(max_steps=7, callbacks=[callback], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(NeuroFMX(n_blocks=2), DataLoader(spike_dataset(64), batch_size=8))
    assert isinstance(callback.sampler.transport, RayTransport)
    store = ShardStore(tmp_path / "mechint_cache")
    assert [e["step"] for e in store.shards()] == [0, 3, 6]
    assert callback.figures()["mechray/shards_written"] == 3
