"""Attention heads on a small GPT-2 (and BERT): per-head outputs as capture points, per-head
attention patterns, head ablation and head patching, and the LM's next-token loss as a metric.

Random init is enough for the plumbing; the rankings use a planted model where every head of
layer 1 but one writes nothing (its rows of ``c_proj`` are zero), so that head must come first.
"""

import pytest
import torch

from mechray import MechIntConfig, MechIntHooks

transformers = pytest.importorskip("transformers")
VOCAB, HEAD, LAYER = 50, 2, "transformer.h.1.attn:heads"


def gpt2(seed: int = 0, planted: bool = False):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    if planted:     # only head 2 of layer 1 writes into the residual stream, and strongly
        with torch.no_grad():
            w = model.transformer.h[1].attn.c_proj.weight       # Conv1D: [n_head * d_head, d]
            keep = w[HEAD * 16:(HEAD + 1) * 16].clone() * 30
            w.zero_()
            w[HEAD * 16:(HEAD + 1) * 16] = keep
    return model


def left_padded(lengths=(7, 5, 7, 3), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def alone(enc, i):
    """Example ``i`` without its padding."""
    real = enc["attention_mask"][i].bool()
    ids = enc["input_ids"][i][real][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_per_head_outputs_are_capture_points_gpt2_and_bert(tmp_path):
    from mechray.capture.heads import head_point, split_heads
    from mechray.storage.reader import ShardStore

    model, enc = gpt2(), left_padded()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).eval()
    cases = [(model, enc, [LAYER, "transformer.h.1.attn.c_proj:input"]),
             (bert, {k: enc[k] for k in ("input_ids", "attention_mask")},
              ["encoder.layer.0.attention:heads", "encoder.layer.0.attention.self:heads"])]
    for n, (m, x, layers) in enumerate(cases):
        config = MechIntConfig(sample_layers=layers, storage_path=str(tmp_path / str(n)),
                               use_ray=False, verbose=False)
        with MechIntHooks(config).attach(m) as hooks, torch.no_grad():
            m(**x)
            hooks.sampler.save_activations(0)
        assert not hooks.sampler.hooked                       # every handle removed
        store = ShardStore(str(tmp_path / str(n)))
        assert sorted(store.layers()) == sorted(layers)
        rows = [store.read_layer(la, 10_000).float() for la in layers]
        assert len(rows[0]) == int(x["attention_mask"].sum())    # real tokens only
        assert torch.equal(rows[0], rows[1])                  # the projection's input, by head
    from mechray.analysis.base import Context, get_analysis

    ctx = Context(store=None, model=bert, eval_data=cases[1][1])     # BERT: both head points
    got = [{e["head"]: e["effect"] for e in get_analysis("causal", {}).run(ctx, la)["ranked"]}
           for la in cases[1][2]]
    assert got[0] == pytest.approx(got[1], rel=1e-4) and len(got[0]) == 4
    assert min(got[0].values()) > 0
    point = head_point(model.transformer.h[1].attn, LAYER)
    assert (point.n_head, point.d_head, point.reads_input) == (4, 16, True)
    assert split_heads(rows[0], 4).shape == (len(rows[0]), 4, 8)     # BERT: d_head 8
    from mechray.errors import UnknownLayerError
    with pytest.raises(UnknownLayerError, match="no head count"):
        MechIntHooks(MechIntConfig(sample_layers=["transformer.h.1.mlp:heads"],
                                   storage_path=str(tmp_path / "x"), use_ray=False)
                     ).register_hooks(model)


def test_attention_patterns_are_per_head_masked_and_padding_free():
    from mechray.analysis.heads import attention_patterns

    model, enc = gpt2(), left_padded()
    before = model.config._attn_implementation, model.config.output_attentions
    pattern = attention_patterns(model, "transformer.h.1.attn", enc)
    assert (model.config._attn_implementation, model.config.output_attentions) == before
    assert pattern.shape == (4, 4, 7, 7)
    m = enc["attention_mask"].bool()
    sums = pattern.sum(-1)                                      # [B, H, T]
    assert torch.allclose(sums[m[:, None].expand_as(sums)], torch.ones(()), atol=1e-5)
    assert (sums[~m[:, None].expand_as(sums)] == 0).all()       # padded queries zeroed
    for i in range(len(m)):                                     # = each example alone
        own = attention_patterns(model, "transformer.h.1.attn", alone(enc, i))[0]
        real = m[i].nonzero().flatten()
        got = pattern[i][:, real][:, :, real]
        assert torch.allclose(got, own, atol=1e-5)
        assert torch.equal(got.triu(1), torch.zeros_like(got))  # causal
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).eval()
    both = attention_patterns(bert, "encoder.layer.0.attention.self",
                              {k: enc[k] for k in ("input_ids", "attention_mask")})
    assert both.shape == (4, 4, 7, 7) and torch.allclose(both.sum(-1), sums, atol=1e-5)


def test_head_ablation_ranks_the_planted_head_first_with_the_lm_loss():
    from mechray.analysis.base import Context, get_analysis
    from mechray.analysis.heads import head_table
    from mechray.analysis.intervene import edit_output

    model, enc = gpt2(planted=True), left_padded()
    ctx = Context(store=None, model=model, eval_data=enc)
    res = get_analysis("causal", {"metric": "lm_loss"}).run(ctx, LAYER)
    assert (res["n_heads"], res["d_head"], res["n_neurons"]) == (4, 16, 64)
    assert res["unembedding"] == "read out lazily"              # no [B, T, vocab] per ablation
    ranking = [e["head"] for e in res["ranked"]]
    effects = {e["head"]: e["effect"] for e in res["ranked"]}
    assert ranking[0] == HEAD and effects[HEAD] > 1e-3
    assert max(v for h, v in effects.items() if h != HEAD) < 1e-4 * effects[HEAD]
    assert head_table({LAYER: res})[0] == {"layer": LAYER, **res["ranked"][0]}

    def ce(h):          # mean next-token loss, each example alone, head h zeroed (or none)
        def zero(t, call):
            t = t.clone()
            t[..., h * 16:(h + 1) * 16] = 0
            return t
        total = count = 0.0
        for i in range(len(enc["input_ids"])):
            x = alone(enc, i)
            with torch.no_grad(), edit_output(model, LAYER, zero if h is not None else
                                              (lambda t, call: None)):
                loss = model(**x, labels=x["input_ids"]).loss
            total += float(loss) * (x["input_ids"].shape[1] - 1)
            count += x["input_ids"].shape[1] - 1
        return total / count
    assert effects[HEAD] == pytest.approx(abs(ce(HEAD) - ce(None)), rel=1e-4)


def test_head_patching_on_prompt_pairs_finds_the_planted_head(tmp_path):
    from mechray import EvalMechIntRunner
    from mechray.analysis.heads import head_table
    from mechray.analysis.inputs import PromptPairs
    from mechray.analysis.render import top_effects

    model, clean = gpt2(planted=True), left_padded()
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][:, -3] = (corrupt["input_ids"][:, -3] + 7) % (VOCAB - 1) + 1
    layers = ["transformer.h.0.attn:heads", LAYER]
    config = MechIntConfig(sample_layers=layers, storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["circuit"],
                           analysis_params={"circuit": {"metric": "logit_diff",
                                                        "answer_tokens": [3, 4],
                                                        "method": "exact", "paths": False,
                                                        "positions": False}})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**clean)
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(model, config)
    out = runner.run_mechint_eval(eval_data=PromptPairs(clean, corrupt))["circuit"]
    res = out[LAYER]
    assert not res.get("skipped"), res
    exact = {e["head"]: e["exact"] for e in res["ranked"]}
    assert res["ranked"][0]["head"] == HEAD and set(exact) == {0, 1, 2, 3}
    assert exact[HEAD] == pytest.approx(res["layer_effect"], abs=1e-4)     # it is the layer
    assert all(abs(v) < 1e-4 for h, v in exact.items() if h != HEAD)
    assert res["warnings"] == []
    table = head_table(out)
    assert (table[0]["layer"], table[0]["head"]) == (LAYER, HEAD)
    assert len(table) == 8 and top_effects(res).startswith("head 2: ")     # the report's column

    from mechray.analysis.base import Context, get_analysis
    ctx = Context(store=None, model=model, eval_data=PromptPairs(clean, corrupt))
    res = get_analysis("circuit", {"metric": "lm_loss", "method": "exact", "paths": False,
                                   "positions": False}).run(ctx, LAYER)
    assert res["ranked"][0]["head"] == HEAD

    def ce(x):          # next-token loss on the clean tokens, real -> real positions only
        with torch.no_grad():
            logp = model(**x).logits.log_softmax(-1)[:, :-1]
        m = clean["attention_mask"].bool()
        keep = m[:, :-1] & m[:, 1:]
        return float(-logp.gather(-1, clean["input_ids"][:, 1:, None])[..., 0][keep].mean())
    assert res["corrupt_metric"] == pytest.approx(abs(ce(corrupt) - ce(clean)), rel=1e-4)
