"""The ``sae`` analysis: dictionary recovery, architectures, params, weights, AuxK, splicing.

Activations are real shards written by :class:`ActivationSampler` from a module that outputs the
batch it is given, so training walks a real :class:`ShardStore`.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mechray.analysis import Context, Skip, get_analysis
from mechray.analysis.base import AnalysisParamsError
from mechray.analysis.sae import safe_name, splice_metrics
from mechray.analysis.sae_model import SAETrainer, SparseAutoencoder, load_sae, save_sae
from mechray.capture.sampler import ActivationSampler
from mechray.storage.reader import ShardStore

D_IN, ATOMS, K_TRUE = 32, 64, 3
FAST = {"n_latents": 128, "k": 3, "batch_size": 256, "lr": 3e-3, "device": "cpu"}


def sparse_data(n: int, atoms: int, seed: int, offset: float = 0.0):
    """``codes @ D`` with unit-norm atoms ``D`` [atoms, 32], 3 active codes in [0.5, 2] per row."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, D_IN, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :K_TRUE]
    codes = torch.zeros(n, atoms).scatter(1, idx, 0.5 + 1.5 * torch.rand(n, K_TRUE, generator=g))
    x = codes @ dictionary + 0.01 * torch.randn(n, D_IN, generator=g)
    return dictionary, x + offset * torch.randn(D_IN, generator=g) / D_IN ** 0.5


def write_store(path, x: torch.Tensor, per_shard: int = 3000) -> ShardStore:
    model = nn.Sequential(OrderedDict(src=nn.Identity()))
    sampler = ActivationSampler(layers=["src"], save_dir=str(path), use_ray=False, verbose=False,
                                max_activations_per_shard=per_shard)
    sampler.register_hooks(model)
    for step, chunk in enumerate(x.split(per_shard)):
        model(chunk)
        sampler.save_activations(step)
    sampler.close()
    return ShardStore(path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    torch.set_num_threads(1)
    dictionary, x = sparse_data(12000, ATOMS, seed=0)
    return write_store(tmp_path_factory.mktemp("sae_store"), x), dictionary, x


def fit(store, out_dir=None, model=None, eval_data=None, **params):
    return get_analysis("sae", {**FAST, **params}).fit(
        Context(store=store, out_dir=out_dir, model=model, eval_data=eval_data), "src")


def test_recovers_known_dictionary_and_splices_well(synthetic, tmp_path):
    """Threshold: mean over true atoms of max cosine to a learned decoder row >= 0.95, and
    >= 90% of atoms matched above 0.9 (measured: ~0.998 mean, every atom > 0.99)."""
    store, dictionary, x = synthetic
    model = nn.Sequential(OrderedDict(src=nn.Identity(), head=nn.Linear(D_IN, 4)))
    r = fit(store, tmp_path, model=model, eval_data=x[:512], epochs=15)
    sae = load_sae(tmp_path / r["weights_path"])
    learned = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (dictionary @ learned.T).max(dim=1).values
    assert best.mean() >= 0.95, f"mean max cosine {best.mean():.3f}"
    assert (best > 0.9).float().mean() >= 0.9
    assert r["explained_variance"] > 0.9 and r["l0"] == pytest.approx(3.0)
    assert r["cosine_similarity"] > 0.95 and 0.8 < r["l2_ratio"] < 1.1
    assert r["dead_fraction"] < 0.5 and r["n_latents"] == 128 and r["d_in"] == D_IN
    assert len(r["latent_log10_frequency"]) == 128
    hist = r["latent_density_histogram"]
    assert sum(hist["counts"]) + hist["never_active"] == 128
    assert r["eval_rows"] == 600 and r["train"]["in_memory"]
    splice = r["splice"]
    assert splice["skipped"] is False and splice["clean"] == 0.0
    assert splice["zero_ablated"] > splice["spliced"] >= 0
    assert splice["fraction_recovered"] > 0.9
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("architecture, extra", [
    ("topk", {}), ("batchtopk", {}), ("relu", {"l1_coefficient": 1.0})])
def test_each_architecture_beats_the_mean(synthetic, architecture, extra):
    store, _, x = synthetic
    r = fit(store, architecture=architecture, epochs=4, **extra)
    baseline = (x - x.mean(0)).pow(2).mean().item()
    assert r["mse"] < 0.3 * baseline, (r["mse"], baseline)
    assert r["mse_mean_baseline"] == pytest.approx(baseline, rel=0.2)
    assert r["explained_variance"] > 0.7
    if architecture == "topk":
        assert r["l0"] == pytest.approx(3.0)
    elif architecture == "batchtopk":     # k per row on average, by a learned threshold
        assert 1.0 < r["l0"] < 6.0
        assert r["k"] == 3
    else:
        assert r["k"] is None and 0 < r["l0"] < 64


def test_streaming_with_a_small_buffer_steps_and_max_rows_is_deterministic(synthetic):
    store, _, _ = synthetic
    # 1 MiB < 2 x 11400 training rows of d=32: shards stream through a 2730-row buffer
    a = fit(store, buffer_mb=1.0, steps=60)
    b = fit(store, buffer_mb=1.0, steps=60)
    assert a["train"]["in_memory"] is False and a["train"]["steps"] == 60
    assert a["mse"] == b["mse"] and a["latent_log10_frequency"] == b["latent_log10_frequency"]
    assert a["explained_variance"] > 0.5
    c = fit(store, max_rows=1000, epochs=2)
    assert c["train"]["rows_seen"] == 2000 and c["train"]["steps"] == 8


def test_params_are_validated_with_field_and_bound(synthetic):
    with pytest.raises(AnalysisParamsError, match=r"k=0.*greater than or equal to 1"):
        get_analysis("sae", {"k": 0})
    with pytest.raises(AnalysisParamsError, match=r"n_latents=1000000.*less than or equal to 655"):
        get_analysis("sae", {"n_latents": 1_000_000})
    with pytest.raises(AnalysisParamsError, match=r"k=16 must be <= n_latents=8"):
        get_analysis("sae", {"n_latents": 8, "k": 16})
    with pytest.raises(AnalysisParamsError, match=r"architecture='gated'.*'topk', 'batchtopk'"):
        get_analysis("sae", {"architecture": "gated"})
    with pytest.raises(AnalysisParamsError, match=r"device='tpu'"):
        get_analysis("sae", {"device": "tpu"})
    with pytest.raises(AnalysisParamsError, match=r"Valid parameters: .*l1_coefficient"):
        get_analysis("sae", {"l1_coef": 1.0})
    store, _, _ = synthetic   # bounds that need the layer width are checked when fitting
    with pytest.raises(AnalysisParamsError, match=r"batch_size\*n_latents=.*lower batch_size"):
        fit(store, n_latents=8192, batch_size=65536)
    with pytest.raises(AnalysisParamsError, match=r"k=300 exceeds n_latents=64.*expansion_factor"):
        get_analysis("sae", {"expansion_factor": 2, "k": 300, "device": "cpu"}).fit(
            Context(store=store), "src")
    with pytest.raises(KeyError, match="captured layers: \\['src'\\]"):
        get_analysis("sae", FAST).fit(Context(store=store), "srcc")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda_is_a_skip_with_the_fix(synthetic):
    with pytest.raises(Skip, match="device='cuda'.*use device='auto' or 'cpu'"):
        fit(synthetic[0], device="cuda", steps=1)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_safetensors_roundtrip_reproduces_encodings(tmp_path, architecture):
    torch.manual_seed(0)
    x = torch.randn(512, 16) * 7 + 3       # input_scale != 1, so folding is exercised
    sae = SparseAutoencoder(16, 64, architecture, k=4, generator=torch.Generator().manual_seed(1))
    sae.init_from_data(x)
    trainer = SAETrainer(sae, lr=1e-2, l1_coefficient=1.0, aux_k=8, dead_steps_threshold=2)
    for batch in x.split(64):
        trainer.step(batch)
    sae.eval()
    path = save_sae(sae, tmp_path / "sae" / f"{safe_name('a.b/c')}.safetensors", {"layer": "a.b/c"})
    assert path.name == "a.b_c.safetensors" and path.with_suffix(".json").is_file()
    tensors = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in tensors.items() if k != "threshold"} == {
        "W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)}
    again = load_sae(path.with_suffix(".json"))
    with torch.no_grad():
        z, z2 = sae.encode(x), again.encode(x)
        torch.testing.assert_close(z2, z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again.decode(z2), sae.decode(z), rtol=1e-4, atol=1e-4)
        pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]   # documented formula
        torch.testing.assert_close(again.pre_acts(x), pre)
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["architecture"] == architecture and config["layer"] == "a.b/c"


def test_fit_writes_weights_only_with_an_out_dir(synthetic, tmp_path):
    store, _, x = synthetic
    r = fit(store, tmp_path, steps=40)
    assert r["weights_path"] == "sae/src.safetensors" and r["config_path"] == "sae/src.json"
    sae = load_sae(tmp_path / r["weights_path"])
    with torch.no_grad():
        ev = 1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev.item() == pytest.approx(r["explained_variance"], abs=0.05)
    assert json.loads((tmp_path / r["config_path"]).read_text())["params"]["k"] == 3
    assert fit(store, steps=5)["weights_path"] is None
    assert r["splice"]["skipped"] is True and "model" in r["splice"]["reason"]


def test_auxk_revives_dead_latents(tmp_path):
    """As many latents as true atoms (each one is needed) and a large mean offset with b_dec
    starting at zero kill latents early; AuxK brings most back (measured: 0.39 -> 0.03)."""
    _, x = sparse_data(12000, 128, seed=2, offset=4.0)
    store = write_store(tmp_path, x)
    common = {"epochs": 4, "b_dec_init": "zeros", "dead_steps_threshold": 20}
    without = fit(store, aux_k=0, **common)["dead_fraction"]
    with_aux = fit(store, **common)["dead_fraction"]
    assert without > 0.2 and with_aux < 0.5 * without, (without, with_aux)


def identity_sae(d: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: a ReLU SAE that reconstructs exactly."""
    sae = SparseAutoencoder(d, 2 * d, "relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_splice_perfect_reconstruction_recovers_everything(tiny_net):
    """``popt`` outputs [B, T, 8]; rows are reshaped for the SAE and back."""
    tiny_net.train()
    data = torch.randn(6, 5, 6)
    r = splice_metrics(identity_sae(8), tiny_net, "popt", data)
    assert r["fraction_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["spliced"] == pytest.approx(0.0, abs=1e-10) and r["zero_ablated"] > 1e-4
    assert r["metric"] == "mse_vs_clean_output" and r["clean"] == 0.0
    assert not tiny_net.popt._forward_hooks and tiny_net.training   # hook gone, mode restored
    rough = SparseAutoencoder(8, 16, "topk", k=1, generator=torch.Generator().manual_seed(0))
    assert 0 < splice_metrics(rough, tiny_net, "popt", data)["fraction_recovered"] < 1


def test_splice_errors_leave_no_hook_and_are_recorded_in_the_result(synthetic, tiny_net):
    with pytest.raises(ValueError, match="feature size 8 but the SAE was trained on 4"):
        splice_metrics(identity_sae(4), tiny_net, "popt", torch.randn(2, 6))
    assert not tiny_net.popt._forward_hooks
    store, _, x = synthetic       # the model has no module "src": the fit still succeeds
    r = fit(store, model=tiny_net, eval_data=torch.randn(4, 6), steps=5)
    assert r["splice"]["skipped"] is True and "'src'" in r["splice"]["reason"]
    assert r["explained_variance"] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_auto_device(synthetic, tmp_path):
    store, dictionary, _ = synthetic
    r = fit(store, tmp_path, device="auto", epochs=15)
    assert r["train"]["device"].startswith("cuda")
    sae = load_sae(tmp_path / r["weights_path"])
    best = (dictionary @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert best.mean() >= 0.95
