"""Eval inputs over HTTP: causal and circuit on a served MiniLM with inputs given as texts (the
server's tokenizer) or token ids, bounded and refused with a hint when bad; token contexts in
answers with ``--tokenizer``.  Real Ray Serve on 127.0.0.1 (a free port), real HTTP (httpx)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from mechray import MechIntConfig, MechIntHooks
from mechray.api.errors import ApiError
from mechray.api.eval_inputs import MAX_SEQUENCES, parse_eval_inputs
from mechray.testing import free_port

LAYER = "encoder.layer.3"
TEXTS = ["The river rose after three days of rain.", "She opened the old wooden door.",
         "The coffee tasted bitter and cold because the printer ran out of paper.", "Snow."]
CAUSAL = {"top_n": 4, "method": "zero"}


@pytest.fixture(scope="module")
def minilm_served(ray_local, tmp_path_factory):
    """A MiniLM store (padded sentences, masks found in the call) served with the model and the
    tokenizer of the demo package."""
    from ray import serve

    from mechray.api.serve_app import build
    from mechray.demo.text import load_minilm, minilm_dir, sentences

    store = tmp_path_factory.mktemp("minilm") / "store"
    model, tok = load_minilm()
    config = MechIntConfig(sample_layers=[LAYER], storage_path=str(store), use_ray=False)
    with MechIntHooks(config).attach(model) as hooks, torch.no_grad():
        model(**tok(sentences(12), padding=True, return_tensors="pt"))
        hooks.save_activations(0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"storage": str(store), "model": "mechray.demo.text:minilm_model",
            "tokenizer": str(minilm_dir()), "analysis_num_cpus": 0.5}
    serve.run(build(args), name="mechray-minilm", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client, tok
    serve.shutdown()


def answer(client, body):
    """The result of a POST /interpret, polling the job when it was queued."""
    r = client.post("/interpret", json=body)
    assert r.status_code in (200, 202), r.text
    if r.status_code == 200:
        return r.json()["result"]
    deadline = time.time() + 300
    while time.time() < deadline:
        job = client.get(r.json()["poll"]).json()
        if job["status"] == "done":
            return job["result"]["result"]
        assert job["status"] != "failed", job
        time.sleep(0.3)
    raise AssertionError("job did not finish")


def test_causal_on_texts_and_on_the_same_token_ids_agree(minilm_served):
    client, tok = minilm_served
    by_text = answer(client, {"analysis_type": "causal", "layer_name": LAYER, "params": CAUSAL,
                              "eval_inputs": {"texts": TEXTS}})
    assert not by_text.get("skipped"), by_text
    assert by_text["masked"] and by_text["n_inputs"] == len(TEXTS)
    ids = [tok(t)["input_ids"] for t in TEXTS]                # ragged: padded and masked there
    assert len({len(i) for i in ids}) > 1
    by_ids = answer(client, {"analysis_type": "causal", "layer_name": LAYER, "params": CAUSAL,
                             "eval_inputs": {"input_ids": ids}})
    a = {e["neuron"]: e["effect"] for e in by_text["ranked"]}
    b = {e["neuron"]: e["effect"] for e in by_ids["ranked"]}
    assert a.keys() == b.keys() and len(a) == 4
    assert all(b[n] == pytest.approx(a[n], rel=1e-4) for n in a)
    fewer = answer(client, {"analysis_type": "causal", "layer_name": LAYER, "params": CAUSAL,
                            "eval_inputs": {"input_ids": ids[:2]}})
    assert fewer["n_inputs"] == 2 and fewer["layer_effect"] != by_ids["layer_effect"]  # own key


def test_circuit_on_token_ids_over_http(minilm_served):
    client, tok = minilm_served
    enc = tok(TEXTS)
    result = answer(client, {"analysis_type": "circuit", "layer_name": LAYER,
                             "params": {"check_neurons": 2, "paths": False},
                             "eval_inputs": {"input_ids": enc["input_ids"],
                                             "attention_mask": enc["attention_mask"]}})
    assert not result.get("skipped"), result
    assert result["masked"] and result["n_inputs"] == 4 and 0 < result["layer_effect"] <= 1


def test_neuron_answers_carry_token_contexts_with_the_server_tokenizer(minilm_served):
    client, _ = minilm_served
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": LAYER,
                                        "params": {"top_k": 3}})
    assert r.status_code == 200, r.text
    contexts = r.json()["result"]["top_k"]["contexts"]
    assert len(contexts) == 384 and all(len(c) == 3 for c in contexts)
    first = contexts[0][0]
    assert first["token"] and "[[" in first["text"] and first["text"].count("]]") == 1


@pytest.mark.parametrize("inputs,words", [
    ({"input_ids": [[101, 10 ** 6, 102]]}, ["10000", "vocabulary has 30522 ids"]),
    ({"input_ids": [[101, -3]]}, ["negative id -3"]),
    ({"input_ids": [[101, 1.5]]}, ["not integers"]),
    ({"input_ids": [[]]}, ["non-empty lists"]),
    ({"input_ids": [[1]] * (MAX_SEQUENCES + 1)}, [f"at most {MAX_SEQUENCES}"]),
    ({"input_ids": [[1] * 600]}, ["600 tokens; at most 512"]),
    ({"input_ids": [[101, 102]], "attention_mask": [[1]]}, ["one value per token"]),
    ({"input_ids": [[101, 102]], "attention_mask": [[1, 7]]}, ["other than 0 and 1"]),
    ({"texts": "one string"}, ["non-empty list of strings"]),
    ({"texts": ["a"], "input_ids": [[1]]}, ["both texts and token ids"]),
    ({"tokens": [[1]]}, ["unknown keys ['tokens']"]),
])
def test_bad_eval_inputs_are_422_with_a_hint(minilm_served, inputs, words):
    client, _ = minilm_served
    r = client.post("/interpret", json={"analysis_type": "causal", "layer_name": LAYER,
                                        "params": CAUSAL, "eval_inputs": inputs})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "bad_eval_inputs", body
    for word in words:
        assert word in body["message"], (word, body["message"])
    assert '{"texts"' in body["message"] or "input_ids" in body["message"]


def test_eval_inputs_on_a_shard_analysis_are_refused(minilm_served):
    client, _ = minilm_served
    r = client.post("/interpret", json={"analysis_type": "neuron", "layer_name": LAYER,
                                        "eval_inputs": {"texts": ["a"]}})
    assert r.status_code == 422 and "only by the analyses that run the served model" in r.text


def test_without_a_model_or_a_tokenizer_the_fix_is_named():
    with pytest.raises(ApiError) as err:
        parse_eval_inputs({"texts": ["a"]}, None, None)
    assert err.value.status == 422 and "--model" in str(err.value.message)
    with pytest.raises(ApiError) as err:
        parse_eval_inputs({"texts": ["a"]}, None, torch.nn.Embedding(5, 2))
    assert "--tokenizer" in str(err.value.message)
    data, digest = parse_eval_inputs({"input_ids": [[1, 2, 3], [4]]}, None,
                                     torch.nn.Embedding(5, 2))
    assert data["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert data["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and len(digest) == 64


def test_mechray_serve_passes_the_tokenizer(monkeypatch):
    from mechray import cli
    from mechray.analysis.contexts import load_tokenizer
    from mechray.api import serve_app as serve
    from mechray.demo.text import minilm_dir

    seen = {}
    monkeypatch.setattr(serve, "run_server", lambda args, **kw: seen.update(args=args, **kw))
    assert cli.main(["serve", "--storage", "/tmp/x", "--tokenizer", str(minilm_dir())]) == 0
    assert seen["args"]["tokenizer"] == str(minilm_dir())
    assert serve.parse_args(seen["args"]).tokenizer == str(minilm_dir())
    tok = load_tokenizer(str(minilm_dir()))                      # a directory: offline
    same = load_tokenizer("mechray.demo.text:minilm_tokenizer")  # package.module:factory
    assert tok("the river")["input_ids"] == same("the river")["input_ids"]
