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
    assert res["masked"] and res["unembedding"] == "read out lazily"      # never [B, T, vocab]
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


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_metrics_read_through_the_unembedding_equal_them_on_full_logits(name):
    from mechray.analysis.inputs import as_inputs
    from mechray.analysis.intervene import Metric
    from mechray.analysis.readout import Readout

    model, tok = gpt2(), tokenizer("right")
    x = as_inputs(tok(TEXTS[:3], padding=True, return_tensors="pt"), 3)
    readout = Readout.find(model, "transformer.h.1", x)
    assert readout is not None and readout.vocab == 30522
    torch.manual_seed(1)
    h_ref = torch.randn(3, x.mask.shape[1], 256)
    h_out = h_ref + 0.3 * torch.randn(2, *h_ref.shape)
    lazy = Metric(name).read_out(readout)
    full = Metric(name)
    want = full.sums(readout.logits(h_out), readout.logits(h_ref), x.mask)
    assert torch.allclose(lazy.sums(h_out, h_ref, x.mask), want, rtol=1e-4)
    assert lazy.count(h_ref, x.mask) == full.count(readout.logits(h_ref), x.mask)


def test_the_sweep_fits_the_memory_budget_or_says_what_it_needs():
    from mechray.analysis.base import Context, get_analysis
    from mechray.errors import AnalysisParamsError

    model, tok = gpt2(), tokenizer("left")
    enc = left_padded(tok, TEXTS)
    stats = {"mean": [0.0] * 256, "std": torch.rand(256).tolist()}
    ctx = Context(store=None, model=model, eval_data=enc,
                  results={"neuron": {"transformer.h.3": stats}})
    small = get_analysis("causal", {"top_n": 4, "memory_budget_gb": 0.004}).run(
        ctx, "transformer.h.3")
    assert small["memory"]["estimated_gb"] <= 0.004
    assert small["memory"]["neuron_batch"] < 16 or small["memory"]["batch_size"] < len(TEXTS)
    roomy = get_analysis("causal", {"top_n": 4, "memory_budget_gb": 4}).run(
        ctx, "transformer.h.3")
    assert roomy["memory"]["neuron_batch"] == 16 and roomy["memory"]["batch_size"] == len(TEXTS)
    assert [e["neuron"] for e in small["ranked"]] == [e["neuron"] for e in roomy["ranked"]]
    with pytest.raises(AnalysisParamsError, match="memory_budget_gb"):
        get_analysis("causal", {"top_n": 4, "memory_budget_gb": 1e-5}).run(ctx, "transformer.h.3")


class Planted(torch.nn.Module):
    """A position-wise token model with a planted circuit: ``mid`` (identity) feeds two
    parallel paths ``a`` (3x) and ``b`` (1x, or squared with ``square=True``) into the
    unembedding.  Token 3 (clean) embeds to [3, 2, 0, ...], token 4 (corrupted) to
    [0, 1, 0, ...]; the logit difference of token 7 over token 8 reads neurons 0 and 1."""

    def __init__(self, square: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d, vocab = 8, 12
        self.square = square
        self.embed = torch.nn.Embedding(vocab, d)
        self.mid = torch.nn.Linear(d, d)
        self.a = torch.nn.Linear(d, d, bias=False)
        self.b = torch.nn.Linear(d, d, bias=False)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, d, generator=gen) * 0.1)
            self.embed.weight[3] = torch.tensor([3.0, 2] + [0] * (d - 2))
            self.embed.weight[4] = torch.tensor([0.0, 1] + [0] * (d - 2))
            self.mid.weight.copy_(torch.eye(d))
            self.mid.bias.zero_()
            self.a.weight.copy_(torch.eye(d) * (0 if square else 3))
            self.b.weight.copy_(torch.eye(d))
            self.lm_head.weight.copy_(torch.randn(vocab, d, generator=gen) * 0.01)
            self.lm_head.weight[7, :2] = 1.0
            self.lm_head.weight[8, :2] = 0.0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        h = self.mid(self.embed(input_ids))
        return self.lm_head(self.a(h) + self.b(h * h if self.square else h))


def planted_pairs():
    clean = {"input_ids": torch.tensor([[5, 1, 2, 3], [0, 6, 1, 3]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}     # left-padded
    corrupt = {"input_ids": torch.tensor([[5, 1, 2, 4], [0, 6, 1, 4]]),
               "attention_mask": clean["attention_mask"].clone()}
    return clean, corrupt


def run_circuit(tmp_path, model, params):
    clean, corrupt = planted_pairs()
    config = MechIntConfig(sample_layers=["mid", "a", "b"], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["circuit"],
                           analysis_params={"circuit": params})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**clean)
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(model, config)
    return runner.run_mechint_eval(eval_data=clean, corrupt_data=corrupt, layers=["mid"],
                                   out_dir=str(tmp_path / "o"))["circuit"]["mid"]


def test_prompt_pairs_logit_diff_positions_and_two_paths_on_a_planted_circuit(tmp_path):
    res = run_circuit(tmp_path, Planted(), {"metric": "logit_diff", "answer_tokens": [7, 8]})
    assert not res.get("skipped"), res
    assert res["corruption"] == "pairs" and res["metric"] == "logit_diff"
    assert res["layer_effect"] == pytest.approx(1.0, abs=1e-5)
    top = res["ranked"][:2]                     # neuron 0 carries 3/4 of the difference
    assert [e["neuron"] for e in top] == [0, 1]
    assert top[0]["exact"] == pytest.approx(0.75, abs=1e-4)
    assert top[0]["attribution"] == pytest.approx(0.75, abs=1e-4)      # linear: they agree
    assert res["warnings"] == []
    grid = res["positions"]                     # position-wise model: only the last position
    assert [round(g["effect"], 4) for g in grid] == [0.0, 0.0, 0.0, 1.0]
    assert grid[-1]["token_id"] == 3
    paths = res["paths"]                        # a carries 3 of 4 parts, b one
    assert paths["a"]["effect"] == pytest.approx(0.75, abs=1e-4)
    assert paths["b"]["effect"] == pytest.approx(0.25, abs=1e-4)


def test_circuit_warns_when_attribution_and_exact_patching_disagree(tmp_path):
    res = run_circuit(tmp_path, Planted(square=True), {"metric": "logit_diff",
                                                       "answer_tokens": [7, 8], "paths": False})
    exact = {e["neuron"]: e["exact"] for e in res["ranked"]}
    assert exact[0] == pytest.approx(0.75, abs=1e-4) and exact[1] == pytest.approx(0.25, abs=1e-4)
    assert res["ranked"][0]["neuron"] == 1            # attribution's (wrong) top neuron
    assert res["attribution_check"]["top1_agree"] is False
    assert len(res["warnings"]) == 1 and "disagrees with exact patching" in res["warnings"][0]


def test_prob_metric_and_texts_with_a_tokenizer(tmp_path):
    """Prompt pairs as texts (tokenised together by the runner's tokenizer, left padding) on
    the GPT-2-style model, with the probability of a target token at the last real token."""
    model, tok = gpt2(), tokenizer("left")
    clean = ["when mary and john went to the store john gave a drink to",
             "the cat and the dog sat on the mat and the dog looked at"]
    corrupt = ["when mary and john went to the store mary gave a drink to",
               "the cat and the dog sat on the mat and the cat looked at"]
    layer = "transformer.h.1"
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["circuit"],
                           analysis_params={"circuit": {
                               "metric": "prob", "target_token": tok.convert_tokens_to_ids("mary"),
                               "check_neurons": 4, "paths": False, "max_positions": 4}})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(clean, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(model, config, tokenizer=tok)
    res = runner.run_mechint_eval(eval_data=clean, corrupt_data=corrupt,
                                  out_dir=str(tmp_path / "o"))["circuit"][layer]
    assert not res.get("skipped"), res
    assert res["corruption"] == "pairs" and res["unembedding"] == "read out lazily"
    assert res["layer_effect"] == pytest.approx(1.0, abs=1e-4)    # the whole layer restores all
    assert res["positions"] is None                  # longer than max_positions: not patched


def test_prompt_pairs_over_http_reach_circuit(tmp_path):
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin
    from mechray.testing import serve_in_thread

    model, tok, layer = gpt2(), tokenizer("left"), "transformer.h.1"
    clean = ["when mary and john went out john gave it to", "the cat sat and the cat saw"]
    corrupt = ["when mary and john went out mary gave it to", "the cat sat and the dog saw"]
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path), use_ray=False,
                           verbose=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(clean, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config, tokenizer=tok)
    mixin.add_routes(app)
    ids = tok.convert_tokens_to_ids(["mary", "john"])
    body = {"analysis_type": "circuit", "layer_name": layer,
            "params": {"metric": "logit_diff", "answer_tokens": ids, "check_neurons": 4,
                       "paths": False, "max_positions": 16},
            "eval_inputs": {"texts": clean, "corrupt_texts": corrupt}}
    try:
        with serve_in_thread(app) as url:
            answer = httpx.post(f"{url}/interpret", json=body, timeout=120)
            bad = httpx.post(f"{url}/interpret", json={**body, "eval_inputs": {
                "texts": clean, "corrupt_texts": corrupt[:1]}}, timeout=60)
    finally:
        mixin.close()
    assert answer.status_code == 200, answer.text
    res = answer.json()["result"]
    assert res["corruption"] == "pairs" and res["layer_effect"] == pytest.approx(1.0, abs=1e-4)
    width = len(res["positions"])
    assert width == tok(clean, padding=True, return_tensors="pt")["input_ids"].shape[1]
    assert res["positions"][-1]["token_id"] == tok.sep_token_id       # the last real token
    assert res["positions"][-1]["token"] == "[SEP]"                   # named as text
    assert bad.status_code == 422 and "corrupt_texts" in bad.text


def test_causal_sets_neurons_to_their_corrupted_values_with_prompt_pairs():
    from mechray.analysis.base import Context, get_analysis
    from mechray.analysis.inputs import PromptPairs

    clean, corrupt = planted_pairs()
    ctx = Context(store=None, model=Planted(), eval_data=PromptPairs(clean, corrupt))
    res = get_analysis("causal", {"method": "corrupt", "metric": "logit_diff",
                                  "answer_tokens": [7, 8], "top_n": 3}).run(ctx, "mid")
    got = {e["neuron"]: e["effect"] for e in res["ranked"]}
    assert {0, 1} < set(got) and res["stats_source"] == "prompt pairs"     # the pairs differ there
    assert got[0] == pytest.approx(12.0, abs=1e-4) and got[1] == pytest.approx(4.0, abs=1e-4)
    assert res["layer_effect"] == pytest.approx(16.0, abs=1e-4)


def test_cli_takes_corrupt_texts_as_prompt_pairs(tmp_path, capsys):
    from mechray.cli import main as cli
    from mechray.demo.text import minilm_dir

    model, tok, layer = gpt2(), tokenizer("right"), "transformer.h.2"
    clean = ["when mary and john went out john gave it to", "the cat sat and the cat saw"]
    corrupt = ["when mary and john went out mary gave it to", "the cat sat and the dog saw"]
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(clean, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    (tmp_path / "clean.txt").write_text("\n".join(clean) + "\n")
    (tmp_path / "corrupt.txt").write_text("\n".join(corrupt) + "\n")
    ids = tok.convert_tokens_to_ids(["mary", "john"])
    params = {"circuit": {"metric": "logit_diff", "answer_tokens": ids, "check_neurons": 2,
                          "paths": False, "max_positions": 2}}
    code = cli(["analyze", str(tmp_path / "c"), "--analyses", "circuit", "--quiet",
                "--model", "test_decoder_lm:gpt2", "--eval-texts", str(tmp_path / "clean.txt"),
                "--corrupt-texts", str(tmp_path / "corrupt.txt"), "--tokenizer",
                str(minilm_dir()), "--params", json.dumps(params), "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr()
    doc = json.loads((tmp_path / "r" / "mechint_results.json").read_text())
    res = doc["results"]["circuit"][layer]
    assert res["corruption"] == "pairs" and res["metric"] == "logit_diff" and res["n_inputs"] == 2
    assert res["layer_effect"] == pytest.approx(1.0, abs=1e-4)


def test_logit_lens_of_residual_neurons_in_results_report_and_http(tmp_path):
    """A neuron of a residual-stream layer promotes the tokens whose unembedding rows are
    largest on it; the report shows them and /interpret answers carry them."""
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin
    from mechray.testing import serve_in_thread

    model, tok, layer = gpt2(), tokenizer("left"), "transformer.h.3"
    with torch.no_grad():                       # plant: neuron 5 writes "paris", against "rome"
        model.lm_head.weight[:, 5] = 0.0
        model.lm_head.weight[tok.convert_tokens_to_ids("paris"), 5] = 9.0
        model.lm_head.weight[tok.convert_tokens_to_ids("rome"), 5] = -9.0
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["neuron"])
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(TEXTS, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(model, config, tokenizer=tok)
    res = runner.run_mechint_eval()["neuron"][layer]
    table = res["logit_lens"]
    assert len(table["units"]) == 32 and len(table["promoted"][0]) == 8
    for u, up, down in zip(table["units"], table["promoted"], table["suppressed"]):
        col = model.lm_head.weight[:, u]
        assert up[0]["token_id"] == int(col.argmax()) and down[0]["token_id"] == int(col.argmin())
    report = runner.export_results(tmp_path / "r").read_text()
    assert "Logit lens, `transformer.h.3`" in report
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(model, config, tokenizer=tok)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            answer = httpx.post(f"{url}/interpret", json={"analysis_type": "neuron",
                                                          "layer_name": layer}, timeout=60)
    finally:
        mixin.close()
    lens = answer.json()["result"]["logit_lens"]
    from mechray.analysis.lens import lens as direct
    got = direct(model.lm_head, torch.eye(256)[[5]], tok.decode, k=1)
    assert got["promoted"][0][0]["token"] == "paris" and got["suppressed"][0][0]["token"] == "rome"
    assert lens["units"] == table["units"]


def test_logit_lens_of_sae_latents(tmp_path):
    from mechray.analysis.sae.model import load_sae

    model, tok, layer = gpt2(), tokenizer("right"), "transformer.h.3"
    config = MechIntConfig(sample_layers=[layer], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False, analyses_to_run=["sae"],
                           analysis_params={"sae": {"n_latents": 64, "k": 4, "steps": 20, "min_steps": 1,
                                                    "device": "cpu"}})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(TEXTS, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(model, config, tokenizer=tok)
    res = runner.run_mechint_eval(out_dir=str(tmp_path / "o"))["sae"][layer]
    table = res["logit_lens"]
    assert table["units"] == res["top_activations"]["latents"][:32]
    w_dec = load_sae(tmp_path / "o" / res["weights_path"]).W_dec.detach()
    for u, up in zip(table["units"], table["promoted"]):
        assert up[0]["token_id"] == int((model.lm_head.weight @ w_dec[u]).argmax())


def test_module_inputs_are_capture_points_and_can_be_ablated(tmp_path):
    """``transformer.h.1.ln_2:input`` is GPT-2's resid_mid: the block's input plus the attention
    output, stored for real tokens only; causal edits it (prefix replay or not, same effects)."""
    from mechray.analysis.base import Context, get_analysis
    from mechray.storage.reader import ShardStore

    model, tok = gpt2(), tokenizer("left")
    enc = left_padded(tok, TEXTS)
    layers = ["transformer.h.1:input", "transformer.h.1.attn", "transformer.h.1.ln_2:input"]
    config = MechIntConfig(sample_layers=layers, storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**enc)
        hooks.sampler.save_activations(0)
    store = ShardStore(str(tmp_path / "c"))
    assert sorted(store.layers()) == sorted(layers)
    rows = {la: store.read_layer(la, 10_000).float() for la in layers}
    real = int(enc["attention_mask"].sum())
    assert all(len(r) == real for r in rows.values())
    assert torch.allclose(rows[layers[2]], rows[layers[0]] + rows[layers[1]], atol=1e-4)
    stats = {"mean": [0.0] * 256, "std": torch.rand(256).tolist()}
    ctx = Context(store=None, model=model, eval_data=enc,
                  results={"neuron": {layers[2]: stats}})
    got = [get_analysis("causal", {"top_n": 3, "reuse_prefix": reuse}).run(ctx, layers[2])
           for reuse in (True, False)]
    effects = [[e["effect"] for e in g["ranked"]] for g in got]
    assert got[0]["prefix_reused"] and not got[1]["prefix_reused"]
    assert effects[0] == pytest.approx(effects[1], rel=1e-4) and min(effects[0]) > 0
    assert got[0]["layer_effect"] == pytest.approx(got[1]["layer_effect"], rel=1e-4)
