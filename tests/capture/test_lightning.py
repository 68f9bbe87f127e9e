"""MechIntCallback inside real Lightning runs: sampling, DDP, resume, failures, figures."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mechray import MechIntCallback, MechIntConfig, ShardStore
from mechray.demo.model import NeuroFMX, spike_dataset

ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp_path, steps, every, callbacks=(), ckpt_path=None, model=None, **trainer_kw):
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.0", "popt"],
                           save_hidden_every_n_steps=every,
                           storage_path=str(tmp_path / "cache"), use_ray=False)
    callback = MechIntCallback(config)
    trainer_kw.setdefault("logger", False)
    trainer_kw.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback, *callbacks], accelerator="cpu",
                         devices=1, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_kw)
    torch.manual_seed(0)
    model = model or NeuroFMX(n_blocks=2, d_model=32)
    trainer.fit(model, DataLoader(spike_dataset(96), batch_size=8), ckpt_path=ckpt_path)
    return callback, trainer


class HookProbe(pl.Callback):
    """Records, per training batch, how many forward hooks the model carries during the step."""

    def __init__(self):
        self.hooks_per_step = []

    def on_before_backward(self, trainer, pl_module, loss):
        n = sum(len(m._forward_hooks) for m in pl_module.modules())
        self.hooks_per_step.append((trainer.global_step, n))


def test_hooks_only_on_sampled_steps(tmp_path):
    probe = HookProbe()
    callback, _ = _fit(tmp_path, steps=7, every=3, callbacks=[probe])
    assert probe.hooks_per_step == [(s, 2 if s % 3 == 0 else 0) for s in range(7)]
    store = ShardStore(tmp_path / "cache")
    assert [e["step"] for e in store.shards()] == [0, 3, 6]
    assert all(e["rows"]["popt"] == 8 for e in store.shards())


def test_gradient_accumulation_puts_every_micro_batch_in_the_step_shard(tmp_path):
    _fit(tmp_path, steps=4, every=2, accumulate_grad_batches=3)
    store = ShardStore(tmp_path / "cache")
    assert [e["step"] for e in store.shards()] == [0, 2]
    assert [e["rows"]["popt"] for e in store.shards()] == [24, 24]


def test_figures_are_logged(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path / "logs"), name="run")
    callback, trainer = _fit(tmp_path, steps=5, every=2, logger=logger, log_every_n_steps=1)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {float(r["mechray/rows_captured"]) for r in rows if r.get("mechray/rows_captured")}
    assert logged == {n * (8 * 32 + 8) for n in (1, 2, 3)}  # after each sampled step
    f = callback.figures()
    assert f["mechray/shards_written"] == 3 and f["mechray/shards_in_flight"] == 0
    assert f["mechray/bytes_captured"] == 3 * (8 * 32 + 8) * 32 * 4
    assert f["mechray/train_thread_seconds"] > 0


class Explode(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise RuntimeError("simulated crash at step 5")


def test_exception_flushes_shards_and_removes_hooks(tmp_path):
    model = NeuroFMX(n_blocks=2, d_model=32)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, steps=20, every=2, callbacks=[Explode()], model=model)
    store = ShardStore(tmp_path / "cache")
    assert [e["step"] for e in store.shards()] == [0, 2, 4]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_resume_from_checkpoint_continues_numbering(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                        save_top_k=-1, filename="{step}")
    _fit(tmp_path, steps=10, every=2, callbacks=[ckpt], enable_checkpointing=True)
    store = ShardStore(tmp_path / "cache")
    before = {e["file"]: e["checksum"] for e in store.shards()}
    assert [e["step"] for e in store.shards()] == [0, 2, 4, 6, 8]
    mtimes = {f: (tmp_path / "cache" / f).stat().st_mtime_ns for f in before}
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)["callbacks"]
    assert any(v.get("next_shard_index") == 2 for v in state.values() if isinstance(v, dict))

    # resume from step 4: shards for steps 4..8 exist already; nothing may be overwritten
    _fit(tmp_path, steps=14, every=2, ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    store.refresh()
    entries = store.shards()
    assert [e["index"] for e in entries] == list(range(10))
    assert [e["step"] for e in entries] == [0, 2, 4, 6, 8, 4, 6, 8, 10, 12]
    for f, digest in before.items():
        assert store.entries[f]["checksum"] == digest
        assert (tmp_path / "cache" / f).stat().st_mtime_ns == mtimes[f]


@pytest.mark.slow
def test_ddp_two_ranks_write_every_shard_and_one_manifest(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "tests/scripts/ddp_train.py"),
                          str(tmp_path), "--devices", "2", "--steps", "9", "--every", "4"],
                         env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not in the manifest" not in run.stderr  # ranks do not mistake each other for strays
    cache = tmp_path / "cache"
    assert not list(cache.glob("manifest.rank*.json"))  # merged into one manifest
    manifest = json.loads((cache / "manifest.json").read_text())
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert sorted(e["file"] for e in manifest["shards"]) == files
    assert files == sorted(f"activations_rank{r:03d}_shard_{i:06d}_step_{s}.pt"
                           for r in (0, 1) for i, s in enumerate([0, 4, 8]))
    # every rank captured its own batch: the inputs (sample indices) differ between ranks
    store = ShardStore(cache)
    seen = {}
    for entry in store.shards():
        payload = store.load(entry)
        assert payload["metadata"]["world_size"] == 2
        ids = payload["inputs"][:, 0, 0].tolist()
        seen.setdefault(entry["rank"], set()).update(ids)
        assert entry["rows"] == {"embed": 4 * 8, "popt": 4}
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_probe_inputs_give_the_same_inputs_at_every_saved_step(tmp_path):
    probe = spike_dataset(5, seed=7).tensors[0]
    config = MechIntConfig(sample_layers=["popt"], save_hidden_every_n_steps=3,
                           storage_path=str(tmp_path / "cache"), use_ray=False)
    trainer = pl.Trainer(max_steps=7, callbacks=[MechIntCallback(config, probe_inputs=probe)],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = NeuroFMX(n_blocks=2, d_model=32)
    trainer.fit(model, DataLoader(spike_dataset(96), batch_size=8))
    assert model.training and sum(len(m._forward_hooks) for m in model.modules()) == 0
    store = ShardStore(tmp_path / "cache")
    probes = [e for e in store.shards() if e["has_inputs"]]
    assert [e["step"] for e in probes] == [0, 3, 6]
    assert [e["rows"]["popt"] for e in probes] == [5, 5, 5]
    for e in probes:
        assert torch.equal(store.load(e)["inputs"], probe)
    train_shards = [e for e in store.shards() if not e["has_inputs"]]
    assert [e["rows"]["popt"] for e in train_shards] == [8, 8, 8]


@pytest.mark.parametrize("cap, groups", [
    # blocks.0 gives 8 x 32 = 256 rows a step: a 700-row cache holds 2 steps, so shards are cut
    # every 2 steps (before a third would push rows out), although steps_per_shard=4
    (700, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]),
    (10000, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),   # the last group is flushed at fit end
])
def test_steps_per_shard_groups_sampled_steps_and_never_drops_rows(tmp_path, cap, groups):
    config = MechIntConfig(sample_layers=["popt", "mamba_backbone.blocks.0"],
                           save_hidden_every_n_steps=1, steps_per_shard=4,
                           max_activations_per_shard=cap, storage_path=str(tmp_path / "cache"),
                           use_ray=False)
    trainer = pl.Trainer(max_steps=10, callbacks=[MechIntCallback(config)], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(NeuroFMX(n_blocks=2, d_model=32), DataLoader(spike_dataset(96), batch_size=8))
    store = ShardStore(tmp_path / "cache")
    assert [e["steps"] for e in store.shards()] == groups
    assert [e["step"] for e in store.shards()] == [g[-1] for g in groups]
    for entry in store.shards():
        payload = store.load(entry)
        assert payload["metadata"]["layers"]["mamba_backbone.blocks.0"]["dropped_rows"] == 0
        assert payload["metadata"]["row_steps"]["popt"].tolist() == \
            [s for s in entry["steps"] for _ in range(8)]
    assert store.layers()["popt"]["rows"] == 10 * 8


def _two_store_fit(tmp_path, steps, ckpt_path=None):
    callbacks = [MechIntCallback(MechIntConfig(
        sample_layers=[layer], save_hidden_every_n_steps=every,
        storage_path=str(tmp_path / name), use_ray=False))
        for name, layer, every in (("a", "popt", 2), ("b", "mamba_backbone.blocks.0", 3))]
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6,
                                        save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=steps, callbacks=[*callbacks, ckpt], accelerator="cpu",
                         devices=1, enable_progress_bar=False, enable_model_summary=False,
                         logger=False)
    torch.manual_seed(0)
    trainer.fit(NeuroFMX(n_blocks=2, d_model=32), DataLoader(spike_dataset(96), batch_size=8),
                ckpt_path=ckpt_path)


def test_two_callbacks_in_one_trainer_each_resume_their_own_store(tmp_path):
    """Two callbacks (two stores) keep their states under separate keys: resuming continues
    each store's numbering. Under Lightning's default key (the class name) the second state
    overwrote the first, so store ``a`` resumed at ``b``'s index and skipped or reused numbers."""
    _two_store_fit(tmp_path, steps=10)
    state = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)["callbacks"]
    mine = {k: v for k, v in state.items() if "MechIntCallback" in str(k)}
    assert len(mine) == 2, list(state)
    assert sorted(v["next_shard_index"] for v in mine.values()) == [2, 3]   # b: 0,3 / a: 0,2,4
    _two_store_fit(tmp_path, steps=12, ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    for name, want_steps in (("a", [0, 2, 4, 6, 8, 6, 8, 10]), ("b", [0, 3, 6, 9, 6, 9])):
        entries = ShardStore(tmp_path / name).shards()
        assert [e["index"] for e in entries] == list(range(len(want_steps))), name
        assert [e["step"] for e in entries] == want_steps, name


def test_a_checkpoint_keyed_by_the_class_name_still_resumes(tmp_path):
    """Checkpoints written before per-store keys hold the state under ``MechIntCallback``."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                        save_top_k=-1, filename="{step}")
    _fit(tmp_path, steps=6, every=2, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "step=4.ckpt"
    full = torch.load(path, weights_only=False)
    key = next(k for k in full["callbacks"] if "MechIntCallback" in str(k))
    full["callbacks"]["MechIntCallback"] = full["callbacks"].pop(key)
    torch.save(full, path)
    _fit(tmp_path, steps=8, every=2, ckpt_path=str(path))
    entries = ShardStore(tmp_path / "cache").shards()
    assert [e["index"] for e in entries] == list(range(len(entries)))
    assert [e["step"] for e in entries] == [0, 2, 4, 4, 6]
