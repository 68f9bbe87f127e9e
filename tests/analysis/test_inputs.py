"""Eval inputs: one builder for tensors, tokenizer dicts, lists and DataLoaders; masks respected
by ablation, patching and splicing."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mechray.analysis.base import Context, get_analysis
from mechray.analysis.inputs import ModelInputs, as_inputs
from mechray.analysis.intervene import Metric, Prefix, forward


class Attn(nn.Module):
    """A tiny masked self-attention block: padding changes nothing at real positions only if the
    mask is passed (and positions are mixed, unlike a per-token MLP)."""

    def __init__(self, vocab=30, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pre = nn.Linear(d, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.calls: list[set] = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls.append({"input_ids"} | ({"attention_mask"} if attention_mask is not None
                                           else set()) | ({"token_type_ids"} if
                                                          token_type_ids is not None else set()))
        h = torch.tanh(self.pre(self.emb(input_ids)))
        scores = h @ h.transpose(1, 2)
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        h = h + self.mix(scores.softmax(-1) @ h)
        return self.out(h)


def enc_of(lengths, seed=0, width=None):
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 30, (n,), generator=gen)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attn().eval()


def test_every_form_of_eval_data_gives_the_same_inputs():
    enc = enc_of([3, 6, 2, 5])
    x = as_inputs(enc, 100)
    assert x.shapes == {k: [4, 6] for k in enc} and x.mask.sum() == 16
    halves = [{k: v[:2, :6] for k, v in enc.items()}, {k: v[2:, :5] for k, v in enc.items()}]
    for data in (halves, DataLoader([{k: v[i] for k, v in enc.items()} for i in range(4)],
                                    batch_size=2)):
        y = as_inputs(data, 100)                      # padded back to the longest, every key
        assert sorted(y.kwargs) == sorted(enc)
        assert all(torch.equal(y.kwargs[k], enc[k]) for k in enc)
    t = torch.randn(10, 3)
    assert torch.equal(as_inputs(DataLoader(list(zip(t, torch.arange(10))), batch_size=4), 7)
                       .tensor, t[:7])                  # (inputs, labels): inputs, capped


def test_bad_eval_data_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="non-tensor values 'input_ids' \\(list\\).*return_tensors"):
        as_inputs({"input_ids": [[1, 2]], "attention_mask": torch.ones(1, 2)}, 10)
    with pytest.raises(ValueError, match="sequence lengths \\[3, 5\\] but no 'attention_mask'"):
        as_inputs([{"input_ids": torch.ones(2, 3, dtype=torch.long)},
                   {"input_ids": torch.ones(2, 5, dtype=torch.long)}], 10)
    with pytest.raises(TypeError, match="eval_data is a str"):
        as_inputs("some text", 10)


def test_dict_batches_call_the_model_with_every_key_and_match_the_masked_call(attn):
    enc = enc_of([3, 7, 4, 7, 2])
    with torch.no_grad():
        want = attn(**enc)
    loader = DataLoader([{k: v[i] for k, v in enc.items()} for i in range(5)], batch_size=2)
    x = as_inputs(loader, 100)
    attn.calls.clear()
    got = torch.cat([forward(attn, b)[b.mask].reshape(-1, 8) for b in
                     [x.select(slice(0, 5))]])
    assert attn.calls == [{"input_ids", "attention_mask", "token_type_ids"}]
    torch.testing.assert_close(got, want[enc["attention_mask"].bool()])


def test_batches_group_by_length_and_trim_only_padding(attn):
    enc = enc_of([2, 9, 3, 8, 2, 9], width=12)
    x = as_inputs(enc, 100)
    batches = x.batches(2)
    assert [b.shapes["input_ids"] for b in batches] == [[2, 2], [2, 8], [2, 9]]
    with torch.no_grad():
        full = attn(**enc)
        order = torch.sort(x.mask.sum(1), stable=True).indices
        trimmed = torch.cat([forward(attn, b)[b.mask] for b in batches])
    torch.testing.assert_close(trimmed, full[order][x.mask[order]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", [("causal", {"top_n": 8, "neuron_batch": 4}),
                                         ("circuit", {"check_neurons": 4, "paths": False})])
def test_interventions_ignore_padding(attn, name, params, tmp_path):
    """The same sentences padded in batches and one at a time (no padding at all) give the same
    effects: padded positions are neither edited nor counted."""
    enc = enc_of([3, 7, 4, 6, 2, 5], width=10)
    together = get_analysis(name, {**params, "batch_size": 6}).run(
        Context(store=None, model=attn, eval_data=enc), "pre")
    alone = get_analysis(name, {**params, "batch_size": 1}).run(
        Context(store=None, model=attn, eval_data=enc), "pre")
    assert together["masked"] and alone["masked"]
    a = {e["neuron"]: e["effect"] for e in together["ranked"]}
    b = {e["neuron"]: e["effect"] for e in alone["ranked"]}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7)
    assert together["layer_effect"] == pytest.approx(alone["layer_effect"], rel=1e-4)
    unmasked = get_analysis(name, {**params, "batch_size": 6}).run(
        Context(store=None, model=attn, eval_data=enc["input_ids"]), "pre")
    assert unmasked["layer_effect"] != pytest.approx(together["layer_effect"], rel=1e-3)


def test_masked_metric_counts_real_positions_only():
    ref = torch.zeros(2, 3, 4)
    out = torch.ones(1, 2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    m = Metric("mse")
    assert float(m.sums(out, ref, mask)[0]) == 3 * 4 and m.count(ref, mask) == 3 * 4
    assert m.value(out[0] * 2, ref, mask) == 4.0


def test_prefix_reuse_skips_the_modules_before_the_layer_and_keeps_outputs(attn):
    x = as_inputs(enc_of([3, 5]), 10)
    prefix, y = Prefix.record(attn, "mix", x)
    assert [m for m, _ in prefix.outputs] == [attn.emb, attn.mix, attn.pre]   # the layer too
    saved = attn.pre.weight.detach().clone(), attn.mix.weight.detach().clone()
    with torch.no_grad():
        attn.pre.weight.zero_()            # only a run that skips "pre" and "mix" is unchanged
        attn.mix.weight.zero_()
        with prefix.reused(3):
            again = forward(attn, x.repeat(3))
        changed = forward(attn, x)
        attn.pre.weight.copy_(saved[0])
        attn.mix.weight.copy_(saved[1])
    torch.testing.assert_close(again, y.repeat(3, 1, 1))
    assert not torch.allclose(changed, y)
    assert "forward" not in attn.emb.__dict__                  # restored


def test_model_inputs_refuse_mismatched_batches():
    with pytest.raises(ValueError, match="disagree on the batch size"):
        ModelInputs(None, {"a": torch.ones(2, 3), "b": torch.ones(3, 3)})


def test_prefix_is_not_replayed_when_a_later_module_changes_it_in_place():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h)
            h.mul_(2)                          # "a"'s output is no longer what "a" returned
            return y + h

    prefix, _ = Prefix.record(InPlace(), "b", ModelInputs(torch.randn(3, 4)))
    assert [type(m).__name__ for m, _ in prefix.outputs] == ["Linear"]      # "b" only, not "a"


def test_minilm_causal_scan_equals_one_neuron_one_sentence_at_a_time():
    """The batched scan (stacked neurons, batches by length, the layer and everything before it
    replayed) gives the effects of the plain computation: each neuron mean-ablated in its own
    forward of each sentence alone (no padding), MSE over every real token."""
    from mechray.analysis.intervene import edit_output
    from mechray.demo.text import load_minilm, sentences

    model, tok = load_minilm()
    texts = sentences(6, seed=5)
    enc = tok(texts, padding=True, return_tensors="pt")
    layer, mean, std = "encoder.layer.3", torch.randn(384) * 0.1, torch.rand(384)
    ctx = Context(store=None, model=model, eval_data=enc,
                  results={"neuron": {layer: {"mean": mean.tolist(), "std": std.tolist()}}})
    res = get_analysis("causal", {"method": "mean", "top_n": 5, "batch_size": 4}).run(ctx, layer)
    assert res["masked"] and res["prefix_reused"] and res["neurons_per_pass"] == 16
    got = {e["neuron"]: e["effect"] for e in res["ranked"]}
    assert sorted(got) == sorted(torch.topk(std, 5).indices.tolist())
    with torch.no_grad():
        alone = [tok([t], return_tensors="pt") for t in texts]
        clean = [model(**e).last_hidden_state for e in alone]
        count = sum(c.numel() for c in clean)
        for j, effect in got.items():
            def ablate(t, call, j=j):
                t = t.clone()
                t[..., j] = mean[j]
                return t
            with edit_output(model, layer, ablate):
                sq = sum(float((model(**e).last_hidden_state - c).pow(2).sum())
                         for e, c in zip(alone, clean))
            assert effect == pytest.approx(sq / count, rel=1e-3, abs=1e-8)
