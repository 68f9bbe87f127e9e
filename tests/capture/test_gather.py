"""Every-step capture gathers consecutive steps into shards (shard_target_mb, shard_max_seconds);
sparse sampling keeps one shard per sampled step; nothing is lost on the way."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mechray import MechIntCallback, MechIntConfig, ShardStore
from mechray.demo.model import NeuroFMX, spike_dataset

# NeuroFMX(n_blocks=2, d_model=32), batch 8: blocks.0 gives 8 x 32 rows of 32 floats and popt 8
# rows of 32 floats a step: (256 + 8) * 32 * 4 = 33,792 bytes a step
STEP_BYTES = (256 + 8) * 32 * 4


def _fit(tmp_path, steps=10, callbacks=(), use_ray=False, **fields):
    config = MechIntConfig(sample_layers=["popt", "mamba_backbone.blocks.0"],
                           storage_path=str(tmp_path / "cache"), use_ray=use_ray, verbose=False,
                           **{"save_hidden_every_n_steps": 1, **fields})
    trainer = pl.Trainer(max_steps=steps, callbacks=[MechIntCallback(config), *callbacks],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    trainer.fit(NeuroFMX(n_blocks=2, d_model=32), DataLoader(spike_dataset(96), batch_size=8))
    return ShardStore(tmp_path / "cache")


def _check_every_row(store, steps=10):
    """Every captured step's rows are in exactly one shard, none dropped, steps in order."""
    seen = [s for e in store.shards() for s in e["steps"]]
    assert seen == list(range(steps))
    for entry in store.shards():
        payload = store.load(entry)
        assert payload["metadata"]["row_steps"]["popt"].tolist() == \
            [s for s in entry["steps"] for _ in range(8)]
        assert not entry.get("dropped_rows")
    assert store.layers()["popt"]["rows"] == steps * 8
    assert store.layers()["mamba_backbone.blocks.0"]["rows"] == steps * 256


@pytest.mark.parametrize("fields, groups", [
    # the defaults: the first step has no step rate yet and is written alone; then steps gather
    # (32 MB target, far away) until fit end
    ({"shard_max_seconds": 3600}, [[0], list(range(1, 10))]),
    # a 0.1 MB target holds 2 steps (a third would pass it)
    ({"shard_target_mb": 0.1, "shard_max_seconds": 3600},
     [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9]]),
    # the row cap cuts first: 600 rows of blocks.0 hold 2 steps
    ({"max_activations_per_shard": 600, "shard_max_seconds": 3600},
     [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9]]),
    # no waiting allowed: a shard per step, as before gathering existed
    ({"shard_max_seconds": 0}, [[s] for s in range(10)]),
    # an explicit steps_per_shard wins
    ({"steps_per_shard": 3}, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]),
])
def test_every_step_capture_gathers_steps_into_shards(tmp_path, fields, groups):
    store = _fit(tmp_path, **fields)
    assert [e["steps"] for e in store.shards()] == groups
    assert [e["step"] for e in store.shards()] == [g[-1] for g in groups]   # named by the last
    _check_every_row(store)


def test_sparse_sampling_keeps_a_shard_per_sampled_step(tmp_path):
    store = _fit(tmp_path, save_hidden_every_n_steps=2, shard_max_seconds=3600)
    assert [e["steps"] for e in store.shards()] == [[0], [2], [4], [6], [8]]


def test_a_checkpoint_hands_off_the_held_steps(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                        save_top_k=-1)
    config = MechIntConfig(sample_layers=["popt"], save_hidden_every_n_steps=1,
                           shard_max_seconds=3600, storage_path=str(tmp_path / "cache"),
                           use_ray=False, verbose=False)
    trainer = pl.Trainer(max_steps=10, callbacks=[MechIntCallback(config), ckpt],
                         accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    torch.manual_seed(0)
    trainer.fit(NeuroFMX(n_blocks=2, d_model=32), DataLoader(spike_dataset(96), batch_size=8))
    store = ShardStore(tmp_path / "cache")
    # checkpoints after steps 3 and 7 (global_step 4 and 8) cut the gathered shards there
    assert [e["steps"] for e in store.shards()] == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9]]
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    [cb_state] = [v for k, v in state["callbacks"].items() if "MechIntCallback" in k]
    assert cb_state["next_shard_index"] == 2   # the held steps 1-3 are shard 1, already counted


class KillWriters(pl.Callback):
    """Kills every writer actor of the store after a few steps (Ray restarts them)."""

    def __init__(self, config, at):
        self.config, self.at, self.killed = config, at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import ray

        from mechray.storage.sink import StorageTarget

        if trainer.global_step in self.at:
            key = StorageTarget.from_config(self.config).key
            for i in range(self.config.num_writers):
                actor = ray.get_actor(f"mechray-writer-{key}-{i}",
                                      namespace=self.config.ray_namespace)
                ray.kill(actor, no_restart=False)
                self.killed += 1


def test_writers_killed_mid_run_lose_no_gathered_step(tmp_path, ray_local):
    fields = {"shard_target_mb": 0.1, "shard_max_seconds": 3600}
    config = MechIntConfig(sample_layers=["popt", "mamba_backbone.blocks.0"],
                           storage_path=str(tmp_path / "cache"), use_ray=True,
                           save_hidden_every_n_steps=1, **fields)
    killer = KillWriters(config, at={2, 5, 8})
    store = _fit(tmp_path, callbacks=[killer], use_ray=True, **fields)
    assert killer.killed == 3 * config.num_writers
    assert [e["steps"] for e in store.shards()] == [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9]]
    _check_every_row(store)
