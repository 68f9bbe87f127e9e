"""Token models: masks keep only real positions, rows carry provenance, lengths vary freely."""

import logging

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from mechray import ActivationSampler, MechIntCallback, MechIntConfig, MechIntHooks, ShardStore
from mechray.analysis.inputs import stored_inputs
from mechray.capture.tokens import TokenBatch
from mechray.cli import main as cli
from mechray.errors import ShardWriteError


class Scale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


class TokenNet(nn.Module):
    """Embedding + elementwise layers (no matmul whose blocking depends on the batch shape, so
    padded and unpadded rows are bit-equal), plus a pooled [B, d] output and a [B, T] score."""

    def __init__(self, vocab: int = 50, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(Scale(d), nn.GELU())
        self.pool = nn.Identity()
        self.score = nn.Identity()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.mlp(self.emb(input_ids))
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.pool((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        self.score(h.sum(-1))
        return h


def padded(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TokenNet()


def sentences(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (n,), generator=gen) for n in lengths]


def test_padded_batch_stores_exactly_the_rows_of_the_unpadded_sentences(net, tmp_path):
    seqs = sentences([3, 9, 5, 1])
    with torch.no_grad():
        loop = torch.cat([net(s[None])[0] for s in seqs])          # one sentence at a time
    s = ActivationSampler(layers=["mlp"], save_dir=tmp_path, use_ray=False)
    with s.attach(net), torch.no_grad():
        net(**padded(seqs))                                        # mask found in the kwargs
        s.save_activations(0)
    payload = ShardStore(tmp_path).load(ShardStore(tmp_path).shards()[0])
    assert torch.equal(payload["activations"]["mlp"], loop)        # exactly: no pad rows
    prov = payload["provenance"]["mlp"]
    assert prov["example"].tolist() == [i for i, q in enumerate(seqs) for _ in q]
    assert prov["position"].tolist() == [p for q in seqs for p in range(len(q))]
    assert prov["token"].tolist() == torch.cat(seqs).tolist()
    assert payload["examples"][1].tolist() == seqs[1].tolist()
    assert payload["examples"][0].tolist() == seqs[0].tolist() + [-1] * 6
    entry = ShardStore(tmp_path).shards()[0]
    assert entry["provenance"] == ["mlp"] and entry["examples"] == 4


def test_context_manager_masks_a_positional_call_and_pooled_outputs_keep_one_row(net, tmp_path):
    seqs = sentences([4, 2, 6])
    enc = padded(seqs)
    s = ActivationSampler(layers=["mlp", "pool"], save_dir=tmp_path, use_ray=False,
                          mask_key=None)                           # no automatic mask
    with s.attach(net), torch.no_grad():
        with s.tokens(mask=enc["attention_mask"], input_ids=enc["input_ids"]):
            net(enc["input_ids"])                                  # the model never sees it
        s.save_activations(0)
    store = ShardStore(tmp_path)
    payload = store.load(store.shards()[0])
    assert payload["activations"]["mlp"].shape == (12, 8)
    assert payload["activations"]["pool"].shape == (3, 8)          # [B, d]: one row each
    assert payload["provenance"]["pool"]["position"].tolist() == [-1, -1, -1]
    assert payload["provenance"]["pool"]["example"].tolist() == [0, 1, 2]


def test_without_a_mask_every_position_is_stored(net, tmp_path):
    enc = padded(sentences([4, 2]))
    s = ActivationSampler(layers=["mlp"], save_dir=tmp_path, use_ray=False, mask_key=None)
    with s.attach(net), torch.no_grad():
        net(**enc)
        s.save_activations(0)
    store = ShardStore(tmp_path)
    assert store.shards()[0]["rows"]["mlp"] == 8 and store.shards()[0]["provenance"] == []


def test_hooks_capture_varying_lengths_into_one_shard_with_keyword_inputs(net, tmp_path):
    config = MechIntConfig(sample_layers=["mlp"], storage_path=str(tmp_path), use_ray=False,
                           save_inputs=True)
    batches = [padded(sentences([3, 7], seed=1)), padded(sentences([2, 2, 11], seed=2))]
    with MechIntHooks(config).attach(net) as hooks, torch.no_grad():
        for b in batches:
            net(**b)
        hooks.sampler.save_activations(5)
    store = ShardStore(tmp_path)
    (entry,) = store.shards()
    payload = store.load(entry)
    assert entry["rows"]["mlp"] == 3 + 7 + 2 + 2 + 11 and entry["has_inputs"]
    assert payload["provenance"]["mlp"]["example"].max() == 4      # 5 examples in the table
    assert payload["examples"].shape == (5, 11)
    assert payload["metadata"]["example_steps"].tolist() == [5] * 5
    inputs = stored_inputs(store, 100)                              # padded to 11, mask kept
    assert inputs.shapes == {"input_ids": [5, 11], "attention_mask": [5, 11],
                             "token_type_ids": [5, 11]}
    with torch.no_grad():                                           # same rows from the stored
        again = inputs(net)[inputs.mask]
    assert torch.equal(again, payload["activations"]["mlp"])


def test_positional_inputs_of_different_lengths_are_refused_clearly(net, tmp_path):
    s = ActivationSampler(layers=["mlp"], save_dir=tmp_path, use_ray=False, save_inputs=True)
    with s.attach(net), torch.no_grad():
        net(torch.randint(1, 50, (2, 4)))
        with pytest.raises(ValueError, match="different lengths cannot share a shard.*keyword"):
            net(torch.randint(1, 50, (2, 6)))


def test_a_shard_that_cannot_be_assembled_names_the_cause_not_the_disk(net, tmp_path):
    # "score" is [B, T]: one row per example whose width is the batch's length, which varies
    s = ActivationSampler(layers=["score"], save_dir=tmp_path, use_ray=False)
    s.register_hooks(net)
    with torch.no_grad():
        net(**padded(sentences([3, 5])))
        net(**padded(sentences([2, 8])))
    s.save_activations(0)
    with pytest.raises(ShardWriteError) as info:
        s.flush()
    s.remove_hooks()
    message = str(info.value)
    assert "'score' produced rows of different feature shapes [(5,), (8,)]" in message
    assert "not a storage problem" in message and "disk space" not in message
    assert list(s._transport.failed) == ["activations_shard_000000_step_0.pt"]  # kept


def test_bad_masks_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"input_ids \[2, 3\] and mask \[2, 4\]"):
        TokenBatch.of(mask=torch.ones(2, 4), input_ids=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        TokenBatch.of(mask=torch.ones(4))


def test_dropped_rows_are_in_the_manifest_and_ls(net, tmp_path, capsys):
    s = ActivationSampler(layers=["mlp"], save_dir=tmp_path, use_ray=False,
                          max_activations_per_shard=10)
    with s.attach(net), torch.no_grad():
        net(**padded(sentences([6, 6])))     # 12 real rows, cap 10
        s.save_activations(0)
    assert s.rows_dropped == {"mlp": 2}
    store = ShardStore(tmp_path)
    assert store.shards()[0]["dropped_rows"] == {"mlp": 2}
    assert store.layers()["mlp"]["dropped_rows"] == 2
    assert cli(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rows dropped by the cap: {'mlp': 2}; raise max_activations_per_shard" in out


class TokenModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TokenNet()

    def training_step(self, batch, batch_idx):
        h = self.net(batch["input_ids"], batch["attention_mask"])   # a positional call
        return (h * batch["attention_mask"][..., None]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_masks_dict_batches_of_varying_length_and_logs_dropped_rows(tmp_path, caplog):
    lengths = [[3, 5], [7, 2], [4, 4], [9, 8]]     # the last step alone exceeds the cap
    data = [padded(sentences(ls, seed=i)) for i, ls in enumerate(lengths)]
    config = MechIntConfig(sample_layers=["net.mlp"], storage_path=str(tmp_path),
                           save_hidden_every_n_steps=1, steps_per_shard=2, use_ray=False,
                           max_activations_per_shard=12)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=4, callbacks=[MechIntCallback(config)], accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="mechray"):
        trainer.fit(TokenModule(), DataLoader(data, batch_size=None))
    store = ShardStore(tmp_path)
    rows = [e["rows"]["net.mlp"] for e in store.shards()]
    assert sum(rows) + store.layers()["net.mlp"]["dropped_rows"] == sum(map(sum, lengths))
    for entry in store.shards():
        payload = store.load(entry)
        prov = payload["provenance"]["net.mlp"]
        table = payload["examples"]
        assert (table[prov["example"].long(), prov["position"].long()] == prov["token"]).all()
        assert (prov["token"] > 0).all()                          # never a pad (id 0) row
    dropped = store.layers()["net.mlp"]["dropped_rows"]
    assert dropped == 9 + 8 - 12
    assert any("rows DROPPED by max_activations_per_shard=12" in r.getMessage()
               for r in caplog.records)


def test_minilm_padded_capture_equals_the_unpadded_loop(tmp_path):
    """The real model: a padded batch stores the rows of the real tokens only, equal (to the
    float rounding of different matmul shapes) to the layer's rows for each sentence alone."""
    from mechray.analysis.intervene import record_outputs
    from mechray.demo.text import load_minilm
    from mechray.demo.text import sentences as english

    model, tok = load_minilm()
    texts = english(6, seed=3)
    config = MechIntConfig(sample_layers=["encoder.layer.2"], storage_path=str(tmp_path),
                           use_ray=False)
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"].float().mean() < 0.9            # there is padding
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**enc)
        hooks.sampler.save_activations(0)
    loop = []
    with torch.no_grad():
        for t in texts:
            with record_outputs(model, "encoder.layer.2") as acts:
                model(**tok([t], return_tensors="pt"))
            loop.append(acts[0][0])
    store = ShardStore(tmp_path)
    payload = store.load(store.shards()[0])
    rows = payload["activations"]["encoder.layer.2"]
    assert rows.shape == (int(enc["attention_mask"].sum()), 384)
    torch.testing.assert_close(rows, torch.cat(loop), rtol=1e-4, atol=1e-5)
    ids = payload["provenance"]["encoder.layer.2"]["token"]
    assert ids.tolist() == enc["input_ids"][enc["attention_mask"].bool()].tolist()


@pytest.mark.parametrize("owner", ["sampler", "hooks"])
def test_save_activations_with_a_mask_stores_exactly_the_unpadded_rows(net, tmp_path, owner):
    """save_activations(step, mask=...): a padded batch run without telling capture (positional
    call, no automatic mask) still stores exactly the rows of the unpadded sentences."""
    seqs = sentences([3, 9, 5, 1])
    with torch.no_grad():
        loop = torch.cat([net(s[None])[0] for s in seqs])
        pooled = torch.stack([net(s[None])[0].mean(0) for s in seqs])
    enc = padded(seqs)
    config = MechIntConfig(sample_layers=["mlp", "pool"], storage_path=str(tmp_path),
                           use_ray=False, mask_key=None)
    hooks = MechIntHooks(config)
    saver = hooks if owner == "hooks" else hooks.sampler
    with hooks.attach(net), torch.no_grad():
        net(enc["input_ids"], enc["attention_mask"])              # positional: not detected
        assert hooks.sampler.cached_rows["mlp"] == 4 * 9           # padding cached ...
        saver.save_activations(0, mask=enc["attention_mask"], input_ids=enc["input_ids"])
        net(enc["input_ids"][:2, :9], enc["attention_mask"][:2, :9])
        saver.save_activations(1, mask=enc["attention_mask"][:2, :9])    # mask only: ids -1
    store = ShardStore(tmp_path)
    first, second = [store.load(e) for e in sorted(store.shards(), key=lambda e: e["step"])]
    assert torch.equal(first["activations"]["mlp"], loop)           # ... but not stored
    torch.testing.assert_close(first["activations"]["pool"], pooled)
    prov = first["provenance"]["mlp"]
    assert prov["example"].tolist() == [i for i, q in enumerate(seqs) for _ in q]
    assert prov["position"].tolist() == [p for q in seqs for p in range(len(q))]
    assert prov["token"].tolist() == torch.cat(seqs).tolist()
    assert first["provenance"]["pool"]["position"].tolist() == [-1] * 4
    assert first["metadata"]["row_positions"]["mlp"].tolist() == list(range(len(loop)))
    assert torch.equal(second["activations"]["mlp"], loop[:12])
    assert second["provenance"]["mlp"]["token"].tolist() == [-1] * 12
    assert store.shards()[0]["provenance"] == ["mlp", "pool"]


def test_save_activations_mask_refuses_rows_it_cannot_place(net, tmp_path):
    seqs = sentences([3, 5])
    enc = padded(seqs)
    s = ActivationSampler(layers=["mlp"], save_dir=tmp_path, use_ray=False, mask_key=None)
    with s.attach(net), torch.no_grad():
        net(enc["input_ids"])
        with pytest.raises(ValueError, match=r"'mlp' output \[2, 5, 8\] does not start with"):
            s.save_activations(0, mask=torch.ones(3, 5))
        assert s.cached_rows["mlp"] == 10                            # nothing lost on refusal
        s.clear_cache()
        with s.tokens(mask=enc["attention_mask"]):
            net(enc["input_ids"])
        with pytest.raises(ValueError, match="already masked at capture"):   # a different mask
            s.save_activations(0, mask=torch.ones_like(enc["attention_mask"]))
