"""The crosscoder on a model trained by a real Lightning ``Trainer``, captured by ``MechIntCallback``
with a probe batch: tokens that appear in the data only from a known step on are born there.

The model: an ``EmbeddingBag`` (the captured layer, GPT-2's 0.02 initialisation) and a linear
head that predicts which of ``V`` tokens are in a bag of ``BAG``.  Tokens ``LATE`` are absent
from the training data before step ``SWITCH`` (their embeddings stay at their initial vectors)
and drawn like the others after it.  The probe batch holds every token from step 0 on, so before
the switch a late token's row is its untrained initial vector: present, small, pointing
elsewhere than where training takes it.  A latent stands for the token most of the probe bags it
fires on hold (the layer is a sum of token vectors, so each token gets a latent; two late tokens
may share one).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mechray import MechIntCallback, MechIntConfig, ShardStore
from mechray.analysis import Context, get_analysis
from mechray.analysis.crosscoder_model import encode_raw, load_crosscoder
from mechray.analysis.step_rows import StepRows

V, D, BAG = 24, 32, 3
LATE = list(range(16, 24))
SWITCH, TOTAL, EVERY, BATCH, PROBE = 160, 241, 40, 32, 512
USED = [40, 80, 120, 160, 200, 240]   # saved steps after the early tokens formed (0 is the init)


def bags(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(vocab, generator=g)[:BAG] for _ in range(n)])


class Switched(Dataset):
    """Batch ``i`` is step ``i``'s: tokens below ``LATE[0]`` before ``SWITCH``, all after."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.cat([bags(SWITCH * BATCH, LATE[0], g),
                            bags((TOTAL - SWITCH) * BATCH, V, g)])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class BagModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(V, D, mode="sum")
        nn.init.normal_(self.emb.weight, std=0.02)
        self.head = nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))

    def training_step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        y = torch.zeros(len(x), V).scatter(1, x, 1.0)
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("switched") / "store"
    config = MechIntConfig(sample_layers=["emb"], save_hidden_every_n_steps=EVERY,
                           storage_path=str(path), use_ray=False, verbose=False)
    probe = bags(PROBE, V, torch.Generator().manual_seed(2))
    trainer = pl.Trainer(max_steps=TOTAL, callbacks=[MechIntCallback(config, probe_inputs=probe)],
                         accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False)
    model = BagModel()
    trainer.fit(model, DataLoader(Switched(), batch_size=BATCH, shuffle=False))
    return ShardStore(path), probe


def test_tokens_that_enter_the_data_late_are_born_late_and_the_others_shared(trained, tmp_path):
    store, probe = trained
    r = get_analysis("crosscoder", {"k": 3, "expansion_factor": 2, "training_steps": USED}
                     ).fit(Context(store=store, out_dir=tmp_path), "emb")
    assert r["pairing"] == "same_inputs" and r["steps"] == USED and r["paired_inputs"] == PROBE
    share = _token_share(store, probe, *load_crosscoder(tmp_path / r["weights_path"]))
    live = [i for i, k in enumerate(r["kind"]) if k != "rare"]
    top = {i: int(share[i].argmax()) for i in live}
    late = [i for i in live if top[i] in LATE]
    seen = {t for i in live for t in range(V) if share[i, t] >= 0.4}
    assert seen == set(range(V)), sorted(set(range(V)) - seen)       # every token has a latent
    covered = {t for i in late for t in LATE if share[i, t] >= 0.4}
    assert covered == set(LATE), sorted(set(LATE) - covered)        # ... late ones a late one
    for i in late:      # born at the save on the switch or the next one: never shared
        assert r["birth_step"][i] in (SWITCH, SWITCH + EVERY), \
            (i, top[i], r["kind"][i], r["relative_strength"][i])
    for t in range(LATE[0]):
        mine = [i for i in live if top[i] == t and share[i, t] >= 0.9]
        assert any(r["kind"][i] == "shared" for i in mine), \
            (t, [(i, r["kind"][i], r["relative_strength"][i]) for i in mine])
    false = [i for i in live if r["birth_step"][i] is not None and i not in late]
    assert not false, [(i, r["birth_step"][i], top[i]) for i in false]
    assert {int(s) for s, c in r["births_per_step"].items() if c} <= {SWITCH, SWITCH + EVERY}


def _token_share(store: ShardStore, probe: torch.Tensor, tensors: dict, config: dict
                 ) -> torch.Tensor:
    """[latents, tokens]: the fraction of the probe bags a latent fires on (its code from every
    step group's row, by the saved weights on raw rows) that hold the token."""
    data = StepRows.read(store, "emb", USED)
    assert data.paired is not None
    x = torch.stack([data.x[g][data.paired[:, g]] for g in range(len(USED))], 1)
    rows = [data.where[0][i][1] for i in data.paired[:, 0]]       # row of the probe batch
    fires = (encode_raw(tensors, config, x) > 0).float()              # [inputs, latents]
    has = torch.zeros(len(rows), V).scatter(1, probe[rows], 1.0)       # [inputs, tokens]
    return (fires.T @ has) / fires.sum(0).clamp_min(1)[:, None]
