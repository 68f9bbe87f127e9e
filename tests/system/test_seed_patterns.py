"""The seed quick reference, run as written (with ``mechray`` as the package), black-box.

Checks file names, manifest entries and shard contents (layers, shapes, rows per step).
"""

import json
import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mechray import ActivationSampler, MechIntCallback, MechIntConfig, MechIntHooks
from mechray.demo.model import NeuroFMX, spike_dataset

SEED_NAME = re.compile(r"^activations_shard_(\d{6})_step_(\d+)\.pt$")
BATCH, SEQ, NEURONS, D = 8, 32, 32, 64


def _model():
    torch.manual_seed(0)
    return NeuroFMX(n_neurons=NEURONS, d_model=D, n_blocks=4)


def _loader(n=64):
    return DataLoader(spike_dataset(n_trials=n, n_neurons=NEURONS, seq_len=SEQ), batch_size=BATCH)


def _trainer(callbacks, steps, **kw):
    return pl.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def _check_store(path, steps, layers):
    """Black-box: the seed's file structure, a manifest listing each shard, shard contents."""
    files = sorted(p.name for p in path.glob("*.pt"))
    assert files == [f"activations_shard_{i:06d}_step_{s}.pt" for i, s in enumerate(steps)]
    manifest = json.loads((path / "manifest.json").read_text())
    assert [e["file"] for e in manifest["shards"]] == files
    for entry, step in zip(manifest["shards"], steps):
        data = torch.load(path / entry["file"], weights_only=True)
        assert set(data["activations"]) == set(layers)
        assert data["metadata"]["step"] == step == entry["step"]
        for name, rows in data["activations"].items():
            assert entry["layers"][name] == {"shape": list(rows.shape), "dtype": "float32"}
            assert entry["rows"][name] == rows.shape[0]
        mapped = torch.load(path / entry["file"], weights_only=True, mmap=True)
        assert torch.equal(mapped["activations"][layers[0]], data["activations"][layers[0]])
    return manifest


def test_pattern_1_lightning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=4, use_ray=False)
    trainer = _trainer([MechIntCallback(config)], steps=10)
    trainer.fit(_model(), _loader())
    manifest = _check_store(tmp_path / "mechint_cache", [0, 4, 8], config.sample_layers)
    first = manifest["shards"][0]
    assert first["rows"] == {"mamba_backbone.blocks.3": BATCH * SEQ, "popt": BATCH}
    assert manifest["config"]["sample_layers"] == config.sample_layers


def test_pattern_2_manual_loop(tmp_path):
    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=3, storage_path=str(tmp_path / "c"),
                           use_ray=False)
    model = _model()
    hooks = MechIntHooks(config)
    hooks.register_hooks(model)
    for step, (batch, _) in enumerate(_loader()):
        outputs = model(batch)
        if step % config.save_hidden_every_n_steps == 0:
            hooks.sampler.save_activations(step)
            hooks.sampler.clear_cache()
    hooks.close()
    manifest = _check_store(tmp_path / "c", [0, 3, 6], config.sample_layers)
    assert manifest["shards"][0]["rows"]["popt"] == BATCH
    # steps 1-3 ran forward before the save at step 3: the cache keeps all of them (under the cap)
    assert manifest["shards"][1]["rows"]["popt"] == 3 * BATCH
    assert outputs[0].shape == (BATCH, SEQ, NEURONS)


def test_example_1_minimal_dict_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = _trainer([MechIntCallback(config={"sample_layers": ["heads.decoder"],
                                                "use_ray": False})], steps=3)
    trainer.fit(_model(), _loader())
    _check_store(tmp_path / "mechint_cache", [0], ["heads.decoder"])


def test_example_3_custom_sampler(tmp_path):
    model = _model()
    sampler = ActivationSampler(layers=["perceiver"], save_dir=str(tmp_path / "custom_cache"),
                                use_ray=False)
    sampler.register_hooks(model)
    for batch, _ in _loader(n=24):
        model(batch)
    sampler.save_activations(global_step=100)
    sampler.close()
    manifest = _check_store(tmp_path / "custom_cache", [100], ["perceiver"])
    assert manifest["shards"][0]["rows"]["perceiver"] == 24 * 8  # 24 trials x 8 latents
