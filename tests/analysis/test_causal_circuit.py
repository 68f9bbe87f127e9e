"""causal ablation and circuit patching on models whose answer is known, with real shard stores."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mechray.analysis.base import AnalysisParamsError, Context, Skip, get_analysis
from mechray.analysis.intervene import edit_output, record_outputs, run_model
from mechray.capture.sampler import ActivationSampler
from mechray.storage.reader import ShardStore

PLANTED = {3: 6.0, 7: 4.0, 11: 2.5}     # neuron -> readout weight; every other weight is 0


class Planted(nn.Module):
    """[B, 8] -> hidden (16 positive neurons) -> readout that reads only neurons 3, 7, 11."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.readout = nn.Linear(16, 2)
        with torch.no_grad():
            self.hidden[0].weight.copy_(torch.rand(16, 8) * 0.5)
            self.hidden[0].bias.fill_(0.1)
            self.readout.weight.zero_()
            for n, w in PLANTED.items():
                self.readout.weight[:, n] = torch.tensor([w, 0.5 * w])

    def forward(self, x):
        return self.readout(self.hidden(x))


class PathNet(nn.Module):
    """x0 -> hidden neuron 5 -> mid neuron 5 -> output; ``side`` adds a direct x0 -> output path."""

    def __init__(self, side: float = 0.0):
        super().__init__()
        torch.manual_seed(1)
        self.hidden, self.mid = nn.Linear(4, 8), nn.Linear(8, 8)
        self.side, self.out = nn.Linear(4, 1), nn.Linear(8, 2)
        with torch.no_grad():
            self.hidden.weight[:, 0] = 0.0           # only neuron 5 sees x0 ...
            self.hidden.weight[5] = torch.tensor([3.0, 0.0, 0.0, 0.0])
            self.mid.weight.copy_(torch.eye(8))
            self.mid.bias.zero_()
            self.out.weight.zero_()                  # ... and only neuron 5 reaches the output
            self.out.weight[:, 5] = torch.tensor([2.0, -1.0])
            self.side.weight.copy_(torch.tensor([[side, 0.0, 0.0, 0.0]]))
            self.side.bias.zero_()

    def forward(self, x):
        m = torch.tanh(self.mid(self.hidden(x)))
        return self.out(m) + self.side(x)


class Graded(nn.Module):
    """16 independent tanh neurons, each read with a different weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.out = nn.Linear(16, 1)
        with torch.no_grad():
            self.hidden[0].weight.copy_(torch.eye(16) * 0.8)
            self.out.weight.copy_((0.1 * 1.3 ** torch.randperm(16).float())[None])

    def forward(self, x):
        return self.out(self.hidden(x))


def capture(model, layers, x, tmp_path, **kw) -> ShardStore:
    sampler = ActivationSampler(layers=layers, save_dir=str(tmp_path), use_ray=False,
                                verbose=False, **kw)
    sampler.register_hooks(model)
    with torch.no_grad():
        model(x)
    sampler.save_activations(0)
    sampler.close()
    return ShardStore(tmp_path)


def no_hooks(model) -> bool:
    return not any(m._forward_hooks for m in model.modules())


@pytest.fixture
def planted(tmp_path):
    model = Planted()
    x = torch.rand(96, 8, generator=torch.Generator().manual_seed(3))
    return model, x, capture(model, ["hidden"], x, tmp_path)


# --- causal --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_causal_ranks_exactly_the_planted_neurons_first(planted, method):
    model, x, store = planted
    model.train()
    res = get_analysis("causal", {"method": method}).run(
        Context(store=store, model=model, eval_data=x), "hidden")
    top = [e["neuron"] for e in res["ranked"][:3]]
    assert set(top) == set(PLANTED)
    assert all(e["effect"] < 1e-9 for e in res["ranked"][3:])
    assert min(e["effect"] for e in res["ranked"][:3]) > 1e-3
    assert res["layer_effect"] > res["ranked"][0]["effect"]
    assert (res["method"], res["metric"], res["n_evaluated"]) == (method, "mse", 16)
    assert model.training and no_hooks(model)          # mode restored, hooks removed
    json.dumps(res, allow_nan=False)
    if method == "zero":                               # the effect is exactly mean((w a)^2)
        a = model.hidden(x).detach()
        for e in res["ranked"][:3]:
            w = model.readout.weight[:, e["neuron"]].detach()
            assert e["effect"] == pytest.approx(float((a[:, e["neuron"], None] * w).pow(2).mean()),
                                                rel=1e-4)
        assert top == [3, 7, 11]


def test_causal_batched_equals_one_neuron_per_pass_and_uses_neuron_means(planted):
    model, x, store = planted
    ctx = Context(store=store, model=model, eval_data=x)
    runs = [get_analysis("causal", {"method": "mean", "neuron_batch": nb, "batch_size": 40}
                         ).run(ctx, "hidden") for nb in (1, 5, 16)]
    eff = [{e["neuron"]: e["effect"] for e in r["ranked"]} for r in runs]
    for other in eff[1:]:
        assert all(other[n] == pytest.approx(eff[0][n], rel=1e-5, abs=1e-10) for n in range(16))
    assert runs[0]["stats_source"] == "stored rows"
    ctx.results = {"neuron": {"hidden": {"mean": [0.0] * 16, "std": [1.0] * 16}}}
    from_results = get_analysis("causal", {"method": "mean"}).run(ctx, "hidden")
    zero = get_analysis("causal", {"method": "zero"}).run(ctx, "hidden")
    assert from_results["stats_source"] == "neuron results"
    assert from_results["ranked"] == zero["ranked"]


class BatchMixing(Planted):
    """Outputs depend on the other rows of the batch, so stacked ablations would leak."""

    def forward(self, x):
        y = super().forward(x)
        return y - 0.5 * y.mean(0)


def test_causal_falls_back_to_one_neuron_per_pass_when_rows_mix(tmp_path):
    model = BatchMixing()
    x = torch.rand(48, 8, generator=torch.Generator().manual_seed(3))
    ctx = Context(store=capture(model, ["hidden"], x, tmp_path), model=model, eval_data=x)
    res = get_analysis("causal", {"neuron_batch": 16}).run(ctx, "hidden")
    a = model.hidden(x).detach()
    for e in res["ranked"][:3]:                     # exact: zeroing n changes y by the centred w a
        w = model.readout.weight[:, e["neuron"]].detach()
        wa = a[:, e["neuron"], None] * w
        want = float((wa - 0.5 * wa.mean(0)).pow(2).mean())
        assert e["effect"] == pytest.approx(want, rel=1e-4)


def test_causal_top_n_by_variance_kl_and_loss_fn(planted):
    model, x, store = planted
    ctx = Context(store=store, model=model, eval_data=x)
    res = get_analysis("causal", {"top_n": 4}).run(ctx, "hidden")
    var = store.read_layer("hidden").var(0)
    assert {e["neuron"] for e in res["ranked"]} == set(torch.topk(var, 4).indices.tolist())
    assert res["n_evaluated"] == 4 and res["selection"] == "top 4 by variance"
    kl = get_analysis("causal", {"metric": "kl"}).run(ctx, "hidden")
    assert {e["neuron"] for e in kl["ranked"][:3]} == set(PLANTED) and kl["metric"] == "kl"
    loss = get_analysis("causal", {"metric": "loss", "loss_fn": "torch:sum"}).run(ctx, "hidden")
    assert [e["neuron"] for e in loss["ranked"][:3]] == [3, 7, 11]
    ctx.loss_fn = lambda out: out[:, 0].mean()         # a Python callable on the context
    attr = get_analysis("causal", {"metric": "loss"}).run(ctx, "hidden")
    a = model.hidden(x).detach()
    assert attr["ranked"][0]["effect"] == pytest.approx(float(6.0 * a[:, 3].mean()), rel=1e-4)


def test_hooks_come_off_when_the_loss_fails(planted):
    model, x, store = planted
    ctx = Context(store=store, model=model, eval_data=x)
    ctx.loss_fn = lambda out: 1 / 0
    with pytest.raises(ZeroDivisionError):
        get_analysis("causal", {"metric": "loss"}).run(ctx, "hidden")
    assert no_hooks(model)


def test_skipped_with_reason_without_model_or_inputs(planted, tmp_path):
    model, x, store = planted
    for name in ("causal", "circuit"):
        with pytest.raises(Skip, match="no model"):
            get_analysis(name).run(Context(store=store, eval_data=x), "hidden")
        with pytest.raises(Skip, match="no eval inputs"):
            get_analysis(name).run(Context(store=store, model=model), "hidden")
    saved = capture(model, ["hidden"], x[:32], tmp_path / "with_inputs", save_inputs=True)
    res = get_analysis("causal").run(Context(store=saved, model=model), "hidden")
    assert res["n_inputs"] == 32 and {e["neuron"] for e in res["ranked"][:3]} == set(PLANTED)
    with pytest.raises(Skip, match="nothing to restore"):  # a sum over the whole shuffled batch
        get_analysis("circuit", {"metric": "loss", "loss_fn": "torch:sum", "batch_size": 96}).run(
            Context(store=store, model=model, eval_data=x), "hidden")
    with pytest.raises(Skip, match="ctx.corrupt_data"):
        get_analysis("circuit", {"corruption": "pairs"}).run(
            Context(store=store, model=model, eval_data=x), "hidden")


@pytest.mark.parametrize("name,params,field", [
    ("causal", {"method": "median"}, "method"), ("causal", {"top_n": 0}, "top_n"),
    ("causal", {"metric": "l1"}, "metric"), ("causal", {"loss_fn": "os.system"}, "loss_fn"),
    ("causal", {"loss_fn": "torch:sum"}, "loss_fn"), ("causal", {"resample": 3}, "resample"),
    ("circuit", {"corruption": "blur"}, "corruption"),
    ("circuit", {"noise_scale": -1}, "noise_scale"),
    ("circuit", {"check_neurons": -2}, "check_neurons"), ("circuit", {"method": "ig"}, "method"),
])
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(AnalysisParamsError, match=field):
        get_analysis(name, params)


# --- circuit -------------------------------------------------------------------------------------

@pytest.fixture
def path_net(tmp_path):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(4))
    return x, tmp_path


@pytest.mark.parametrize("corruption", ["shuffle", "noise", "pairs"])
def test_circuit_finds_the_known_path(path_net, corruption):
    x, tmp_path = path_net
    model = PathNet()
    ctx = Context(store=capture(model, ["hidden"], x, tmp_path), model=model, eval_data=x)
    ctx.corrupt_data = x.clone()
    ctx.corrupt_data[:, 0] = -x[:, 0]                 # pairs: only the path's feature differs
    res = get_analysis("circuit", {"corruption": corruption}).run(ctx, "hidden")
    assert res["layer_effect"] == pytest.approx(1.0, abs=1e-5)
    first, rest = res["ranked"][0], res["ranked"][1:]
    assert first["neuron"] == 5 and first["exact"] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(e["exact"]) < 1e-5 and abs(e["attribution"]) < 1e-6 for e in rest)
    assert res["attribution_check"]["top1_agree"] and res["attribution_check"]["n"] == 8
    assert res["method"] == "activation patching + attribution" and no_hooks(model)
    json.dumps(res, allow_nan=False)
    exact = get_analysis("circuit", {"corruption": corruption, "method": "exact",
                                     "check_neurons": 0}).run(ctx, "hidden")
    assert exact["ranked"][0]["neuron"] == 5 and exact["ranked"][0]["effect"] == first["exact"]


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_attribution_agrees_with_exact_patching_on_a_sample(tmp_path):
    model = Graded()
    # Orthogonal +-1 features and corrupt = -clean: the neurons' changes are uncorrelated, so
    # for mse the first-order estimate is exactly twice the exact effect (a quadratic at the
    # corrupt point), and the exact effects add up to the whole layer's.
    x = hadamard(128)[:, 1:17].contiguous()
    ctx = Context(store=capture(model, ["hidden"], x, tmp_path), model=model, eval_data=x)
    ctx.corrupt_data = -x
    res = get_analysis("circuit", {"corruption": "pairs", "check_neurons": 8, "top_k": 16}
                       ).run(ctx, "hidden")
    check = res["attribution_check"]
    assert check["n"] == 8 and len(res["ranked"]) == 16
    assert check["spearman"] == pytest.approx(1.0) and check["top1_agree"]
    sampled = [e for e in res["ranked"] if "exact" in e]
    assert {e["neuron"] for e in sampled} == set(check["neurons"])
    for e in sampled:
        assert e["attribution"] == pytest.approx(2 * e["exact"], rel=1e-3, abs=2e-6)
    assert res["ranked"][0]["neuron"] == int(torch.argmax(model.out.weight[0]))
    assert res["layer_effect"] == pytest.approx(1.0, abs=1e-5)
    exact = get_analysis("circuit", {"corruption": "pairs", "method": "exact"}).run(ctx, "hidden")
    assert sum(e["effect"] for e in exact["ranked"]) == pytest.approx(1.0, abs=1e-4)
    # random inputs and a shuffle: the estimate still ranks the sample well
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(5))
    noisy = get_analysis("circuit", {"check_neurons": 8}).run(
        Context(store=ctx.store, model=model, eval_data=x), "hidden")["attribution_check"]
    assert noisy["spearman"] > 0.8 and noisy["top1_agree"]


def test_path_patching_through_later_layers(path_net):
    x, tmp_path = path_net
    model = PathNet(side=2.0)
    store = capture(model, ["hidden", "mid", "side"], x, tmp_path)
    res = get_analysis("circuit").run(Context(store=store, model=model, eval_data=x), "hidden")
    assert 0.05 < res["layer_effect"] < 0.95          # x0 also reaches the output via `side`
    assert set(res["paths"]) == {"mid", "side"}
    assert res["paths"]["mid"]["effect"] == pytest.approx(res["layer_effect"], abs=1e-5)
    assert abs(res["paths"]["side"]["effect"]) < 1e-6
    assert no_hooks(model)


# --- intervention utilities ----------------------------------------------------------------------

class TupleOut(nn.Module):
    def forward(self, x):
        return {"aux": "label", "h": (x * 2, x)}


def test_edit_output_edits_the_first_tensor_of_nested_outputs_and_removes_the_hook():
    model = nn.Sequential(TupleOut())
    x = torch.ones(2, 3)
    with edit_output(model, "0", lambda t, call: t + 1):
        out = model(x)
    assert out["aux"] == "label" and torch.equal(out["h"][0], x * 3) and torch.equal(out["h"][1], x)
    assert no_hooks(model)
    with pytest.raises(RuntimeError), edit_output(model, "0", lambda t, call: t):
        raise RuntimeError("boom")
    assert no_hooks(model)
    with record_outputs(model, "0") as acts:
        model(x)
        model(x)
    assert len(acts) == 2 and torch.equal(acts[0], x * 2)
    assert run_model(nn.Linear(3, 1), torch.ones(5, 3), batch_size=2).shape == (5, 1)


def test_zero_ablation_needs_no_store_and_wide_layers_need_variances():
    model = Planted()
    x = torch.rand(32, 8, generator=torch.Generator().manual_seed(3))
    res = get_analysis("causal").run(Context(store=None, model=model, eval_data=x), "hidden")
    assert res["stats_source"] == "none" and [e["neuron"] for e in res["ranked"][:3]] == [3, 7, 11]
    with pytest.raises(ValueError, match="top_n=4 on 16 neurons needs stored rows"):
        get_analysis("causal", {"top_n": 4}).run(Context(store=None, model=model, eval_data=x),
                                                 "hidden")
    assert no_hooks(model)
