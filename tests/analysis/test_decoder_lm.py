"""Decoder-only LMs at defaults: left and right padding, bounded metrics, prompt pairs.

A GPT-2-architecture model (random init: enough for indexing and shapes) with MiniLM's
tokenizer as vocabulary (nothing is downloaded), and MiniLM itself as the BERT-style case.
"""

import json
import re

import pytest
import torch

from mechray import EvalMechIntRunner, MechIntConfig, MechIntHooks

transformers = pytest.importorskip("transformers")
TEXTS = ["the river rose after three days of rain and the roads closed",
         "she opened the door", "a cat slept", "the market was crowded on Saturday morning",
         "snow covered the mountain roads", "he forgot his umbrella"]


def tokenizer(side: str):
    from mechray.demo.text import minilm_tokenizer

    tok = minilm_tokenizer()
    tok.padding_side = side
    return tok


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=30522,
                                     n_positions=128, bos_token_id=101, eos_token_id=102)
    return transformers.GPT2LMHeadModel(config).eval()


def stored_tokens(store_path, layer):
    """{(shard file, row): token id} from the shards' provenance."""
    from mechray.storage.reader import ShardStore

    store = ShardStore(str(store_path))
    out = {}
    for entry in store.shards():
        prov = store.load(entry)["provenance"][layer]
        for row, tok in enumerate(prov["token"].tolist()):
            out[(entry["file"], row)] = tok
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_every_context_shows_the_token_stored_for_its_row(tmp_path, side, arch):
    from mechray.demo.text import load_minilm

    tok = tokenizer(side)
    if arch == "gpt2":
        model, layer = gpt2(), "transformer.h.1"
    else:
        model, layer = load_minilm()[0], "encoder.layer.2"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"][:, 0 if side == "left" else -1] == 0).any()
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["neuron"],
                           analysis_params={"neuron": {"top_k": 4}})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**enc)
        hooks.sampler.save_activations(0)
    stored = stored_tokens(tmp_path / "c", layer)
    runner = EvalMechIntRunner(None, config, tokenizer=tok, context_window=3)
    top = runner.run_mechint_eval()["neuron"][layer]["top_k"]
    checked = 0
    for shards, rows, contexts in zip(top["shard"], top["row"], top["contexts"]):
        for shard, row, ctx in zip(shards, rows, contexts):
            assert ctx is not None
            assert ctx["token_id"] == stored[(shard, row)]
            assert ctx["token"] == tok.decode([stored[(shard, row)]])
            real = enc["input_ids"][ctx["example"]][enc["attention_mask"][ctx["example"]].bool()]
            assert int(real[ctx["position"]]) == ctx["token_id"]      # position among real ones
            checked += 1
    assert checked == 4 * len(top["shard"])
    report = runner.export_results(tmp_path / "res").read_text()
    saved = json.loads((tmp_path / "res" / "mechint_results.json").read_text())
    assert saved["results"]["neuron"][layer]["top_k"]["contexts"] == top["contexts"]
    shown = re.findall(r"\*\*(.+?)\*\*", report.replace("\\", ""))
    assert shown and set(shown) <= {c["token"].strip() for unit in top["contexts"] for c in unit}


def left_padded(tok, texts):
    """A left-padded batch with the position ids ``generate`` gives it (so padding does not
    shift the real tokens' positions)."""
    enc = tok(texts, padding=True, return_tensors="pt")
    enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return enc


def test_left_padded_causal_scan_equals_each_sentence_alone():
    """Masked ablation on a left-padded causal LM: padded positions are neither edited nor
    compared, so the batched scan equals each sentence run alone (no padding)."""
    from mechray.analysis.base import Context, get_analysis
    from mechray.analysis.intervene import edit_output

    model, tok = gpt2(), tokenizer("left")
    enc = left_padded(tok, TEXTS)
    layer, mean, std = "transformer.h.2.mlp", torch.randn(256) * 0.1, torch.rand(256)
    ctx = Context(store=None, model=model, eval_data=enc,
                  results={"neuron": {layer: {"mean": mean.tolist(), "std": std.tolist()}}})
    res = get_analysis("causal", {"method": "mean", "top_n": 3, "batch_size": 4}).run(ctx, layer)
    assert res["masked"]
    got = {e["neuron"]: e["effect"] for e in res["ranked"]}
    with torch.no_grad():
        alone = [tok([t], return_tensors="pt") for t in TEXTS]
        clean = [model(**e).logits for e in alone]
        count = sum(c.numel() for c in clean)
        for j, effect in got.items():
            def ablate(t, call, j=j):
                t = t.clone()
                t[..., j] = mean[j]
                return t
            with edit_output(model, layer, ablate):
                sq = sum(float((model(**e).logits - c).pow(2).sum())
                         for e, c in zip(alone, clean))
            assert effect == pytest.approx(sq / count, rel=1e-3, abs=1e-9)


def test_interpret_over_http_shows_the_stored_token_of_left_padded_rows(tmp_path):
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin
    from mechray.testing import serve_in_thread

    model, tok, layer = gpt2(), tokenizer("left"), "transformer.h.0"
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path), use_ray=False,
                           verbose=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(TEXTS, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    stored = stored_tokens(tmp_path, layer)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(None, config, tokenizer=tok)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            answer = httpx.post(f"{url}/interpret", json={"analysis_type": "neuron",
                                                          "layer_name": layer,
                                                          "params": {"top_k": 2}}, timeout=60)
    finally:
        mixin.close()
    assert answer.status_code == 200, answer.text
    top = answer.json()["result"]["top_k"]
    pairs = [(s, r, c) for ss, rr, cc in zip(top["shard"], top["row"], top["contexts"])
             for s, r, c in zip(ss, rr, cc)]
    assert len(pairs) == 2 * 256
    assert all(c["token_id"] == stored[(s, r)] for s, r, c in pairs)


def test_an_explicit_mask_equal_to_the_forwards_is_accepted_and_a_different_one_refused(tmp_path):
    from mechray.capture.sampler import ActivationSampler

    model, tok = gpt2(), tokenizer("left")
    enc = tok(TEXTS[:3], padding=True, return_tensors="pt")
    sampler = ActivationSampler(layers=["transformer.h.0"], save_dir=str(tmp_path / "a"),
                                use_ray=False)
    sampler.register_hooks(model)
    try:
        with torch.no_grad():
            model(**enc)
        assert sampler.save_activations(0, mask=enc["attention_mask"].clone(),
                                        input_ids=enc["input_ids"]) is not None
        with torch.no_grad():
            model(**enc)
        other = enc["attention_mask"].clone()
        other[0, -1] = 0
        with pytest.raises(ValueError, match="other than this one"):
            sampler.save_activations(1, mask=other)
    finally:
        sampler.close()
    tokens = stored_tokens(tmp_path / "a", "transformer.h.0")
    assert sorted(tokens.values()) == sorted(enc["input_ids"][enc["attention_mask"].bool()]
                                             .tolist())
