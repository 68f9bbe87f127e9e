"""Token contexts: top-activating rows shown as the text around them, escaped in the report."""

import json

import pytest
import torch
from torch import nn

from mechray import EvalMechIntRunner, MechIntConfig, MechIntHooks
from mechray.analysis.contexts import escape_markdown

VOCAB = ["<pad>", "the", "cat", "sat", "on", "mat", "<script>|*x*", "dog", "ran", "far"]


class Spiky(nn.Module):
    """Neuron j fires (value 10 + position) exactly on token id j + 1; elsewhere 0."""

    def forward(self, input_ids, attention_mask=None):
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids).float()
        hits = torch.nn.functional.one_hot(input_ids, len(VOCAB))[..., 1:].float()
        return self.out(hits * (10 + pos)[..., None])

    def __init__(self):
        super().__init__()
        self.out = nn.Identity()


def decode(ids):
    return " ".join(VOCAB[i] for i in ids)


def test_neuron_top_rows_come_with_their_text_and_the_report_escapes_it(tmp_path):
    sents = [[1, 2, 3, 4, 1, 5], [7, 8, 9], [1, 6, 3]]
    width = max(map(len, sents))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sents])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in sents])[:, None]).long()
    model = Spiky()
    config = MechIntConfig(sample_layers=["out"], storage_path=str(tmp_path / "cache"),
                           use_ray=False, analyses_to_run=["neuron"], verbose=False,
                           analysis_params={"neuron": {"top_k": 2}})
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        hooks.sampler.save_activations(0)
    runner = EvalMechIntRunner(None, config, tokenizer=decode, context_window=2)
    results = runner.run_mechint_eval()
    top = results["neuron"]["out"]["top_k"]
    cat = top["contexts"][1][0]               # neuron 1 fires on "cat" (id 2)
    assert (cat["left"], cat["token"], cat["right"]) == ("the", "cat", "sat on")
    assert (cat["example"], cat["position"], cat["token_id"], cat["step"]) == (0, 1, 2, 0)
    the = top["contexts"][0]                  # "the" at position 4 beats position 0
    assert [(c["example"], c["position"]) for c in the] == [(0, 4), (0, 0)]
    assert the[0]["text"] == "sat on [[the]] mat"
    script = top["contexts"][5][0]
    assert script["token"] == "<script>|*x*" and script["right"] == "sat"
    report = runner.export_results(tmp_path / "res")
    text = report.read_text()
    assert "&lt;script&gt;\\|\\*x\\* **sat**" in text and "<script>" not in text
    saved = json.loads((tmp_path / "res" / "mechint_results.json").read_text())
    assert saved["token_contexts"] > 0
    assert saved["results"]["neuron"]["out"]["top_k"]["contexts"][1][0]["token"] == "cat"


def test_without_provenance_contexts_are_none(tiny_net, tmp_path):
    config = MechIntConfig(sample_layers=["popt"], storage_path=str(tmp_path), use_ray=False,
                           analyses_to_run=["neuron"], verbose=False)
    with MechIntHooks(config).attach(tiny_net) as hooks, torch.no_grad():
        tiny_net(torch.randn(4, 3, 6))
        hooks.sampler.save_activations(0)
    results = EvalMechIntRunner(None, config, tokenizer=decode).run_mechint_eval()
    assert all(c is None for unit in results["neuron"]["popt"]["top_k"]["contexts"]
               for c in unit)


def test_escape_markdown_neutralises_markup():
    assert escape_markdown("a|b\n`x` <img src=y> [l](u) *s* _t_ #h") == \
        "a\\|b \\`x\\` &lt;img src=y&gt; \\[l\\]\\(u\\) \\*s\\* \\_t\\_ \\#h"


def test_interpret_answers_carry_token_contexts_over_http(tmp_path):
    import httpx
    from fastapi import FastAPI

    from mechray import FastAPIIntegrationMixin
    from mechray.testing import serve_in_thread

    ids = torch.tensor([[1, 6, 3, 0], [7, 8, 9, 2]])
    mask = (ids > 0).long()
    config = MechIntConfig(sample_layers=["out"], storage_path=str(tmp_path), use_ray=False,
                           verbose=False)
    model = Spiky()
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        hooks.sampler.save_activations(0)
    app = FastAPI()
    mixin = FastAPIIntegrationMixin(None, config, tokenizer=decode)
    mixin.add_routes(app)
    try:
        with serve_in_thread(app) as url:
            answer = httpx.post(f"{url}/interpret", json={"analysis_type": "neuron",
                                                          "layer_name": "out",
                                                          "params": {"top_k": 1}}, timeout=60)
    finally:
        mixin.close()
    assert answer.status_code == 200, answer.text
    contexts = answer.json()["result"]["top_k"]["contexts"]
    assert contexts[5][0]["token"] == "<script>|*x*"          # JSON-escaped data, not markup
    assert contexts[5][0]["left"] == "the" and contexts[5][0]["right"] == "sat"
    assert contexts[6][0]["token"] == "dog" and contexts[6][0]["right"] == "ran far cat"


@pytest.mark.slow
def test_cli_analyze_takes_eval_texts_and_a_tokenizer(tmp_path, capsys):
    from mechray.cli import main as cli
    from mechray.demo.text import load_minilm, minilm_dir, sentences

    model, tok = load_minilm()
    texts = sentences(6, seed=5)
    config = MechIntConfig(sample_layers=["encoder.layer.4"], storage_path=str(tmp_path / "c"),
                           use_ray=False, verbose=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(texts, padding=True, return_tensors="pt"))
        hooks.sampler.save_activations(0)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    code = cli(["analyze", str(tmp_path / "c"), "--analyses", "neuron,causal", "--quiet",
                "--model", "mechray.demo.text:minilm_model", "--eval-texts",
                str(tmp_path / "texts.txt"), "--tokenizer", str(minilm_dir()),
                "--params", '{"causal": {"top_n": 2}}', "--out", str(tmp_path / "res")])
    assert code == 0, capsys.readouterr()
    doc = json.loads((tmp_path / "res" / "mechint_results.json").read_text())
    causal = doc["results"]["causal"]["encoder.layer.4"]
    assert causal["masked"] and causal["n_inputs"] == 6 and len(causal["ranked"]) == 2
    assert doc["eval_inputs_source"] == "eval_data"
    ctx = doc["results"]["neuron"]["encoder.layer.4"]["top_k"]["contexts"][0][0]
    assert ctx["token"].strip() and ctx["text"]
