"""The engine, EvalMechIntRunner, export and CLI on real captured shards (local and moto S3),
in-process and on a real local Ray.  Ray tests come last: the ``ray_local`` fixture is
module-scoped, and everything before it runs with ``use_ray=False``."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mechray import EvalMechIntRunner, MechIntCallback, MechIntConfig, MechIntHooks, ShardError
from mechray.analysis import Skip
from mechray.analysis.base import REGISTRY, Analysis
from mechray.analysis.engine import Engine
from mechray.cli import main as cli_main

LAYERS = ["mamba_backbone.blocks.1", "popt"]
FAST = {"feature": {"n_components": 3, "n_clusters": 3, "batch_size": 32}}


def capture(tiny_net, path, steps=(0, 1, 2, 3), **fields):
    """Pattern 2 capture of TinyNet: one shard per step, inputs kept."""
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(path), use_ray=False,
                           verbose=False, save_inputs=True, **fields)
    g = torch.Generator().manual_seed(0)
    with MechIntHooks(config).attach(tiny_net) as hooks:
        for step in steps:
            with torch.no_grad():
                tiny_net(torch.randn(3, 5, 6, generator=g))
            hooks.sampler.save_activations(step)
    return config


def engine(path, **kw):
    return Engine(str(path), use_ray=False, progress=False, **kw)


def close(a, b, path="results"):
    """Equal up to float64 summation order (1e-9 relative); everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --- skips, failures, corrupt shards -----------------------------------------------------------
class _NeedsThing(Analysis):
    name, kind = "_needs_thing", "fit"

    def fit(self, ctx, layer):
        raise Skip(f"no thing for {layer}")


class _Broken(Analysis):
    name, kind = "_broken", "fit"

    def fit(self, ctx, layer):
        raise RuntimeError("boom")


def test_skipped_and_failed_analyses_are_recorded_per_layer(tiny_net, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "_needs_thing", _NeedsThing)
    monkeypatch.setitem(REGISTRY, "_broken", _Broken)
    capture(tiny_net, tmp_path / "s", steps=[0])
    res = engine(tmp_path / "s").run(["neuron", "_needs_thing", "_broken", "dynamics", "causal",
                                      "no_such_analysis"])
    for layer in LAYERS:
        assert res["_needs_thing"][layer] == {"skipped": True, "reason": f"no thing for {layer}"}
        assert res["_broken"][layer]["skipped"] and res["_broken"][layer]["error"] == \
            "RuntimeError: boom"
        dyn, causal = res["dynamics"][layer], res["causal"][layer]
        assert dyn["skipped"] and "at least 2" in dyn["reason"]
        assert causal["skipped"] and "needs the model" in causal["reason"]
        assert "unknown analysis 'no_such_analysis'" in res["no_such_analysis"][layer]["reason"]
        assert res["neuron"][layer]["num_samples"] > 0          # the rest of the run survives


def test_corrupt_shard_is_a_clear_error_naming_it(tiny_net, tmp_path):
    capture(tiny_net, tmp_path / "s")
    victim = sorted((tmp_path / "s").glob("*_step_2.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=victim.name):
        engine(tmp_path / "s").run(["neuron"])


# --- runner, export, report --------------------------------------------------------------------
def test_export_holds_every_analysis_and_layer(tiny_net, tmp_path):
    config = capture(tiny_net, tmp_path / "s", analyses_to_run=["neuron", "feature", "dynamics",
                                                                "causal"], analysis_params=FAST)
    runner = EvalMechIntRunner(None, config)
    results = runner.run_mechint_eval()
    report = runner.export_results(tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "mechint_results.json").read_text())
    assert list(doc["results"]) == ["neuron", "feature", "dynamics", "causal"] == list(results)
    for name, per in doc["results"].items():
        assert sorted(per) == sorted(LAYERS), name
    for layer in LAYERS:
        assert (tmp_path / "out" / doc["results"]["feature"][layer]["components_path"]).is_file()
        assert doc["results"]["causal"][layer]["skipped"]
        assert len(doc["results"]["neuron"][layer]["mean"]) == 8
    assert doc["eval_inputs_source"] == "stored inputs" and doc["eval_inputs"][1:] == [5, 6]
    text = report.read_text()
    for name in results:
        section = text.split(f"## {name}")[1].split("\n## ")[0]
        for layer in LAYERS:
            assert f"`{layer}`" in section, (name, layer)
    assert "needs the model" in text
    for png in ("neuron_activations.png", "explained_variance.png", "dynamics.png"):
        assert f"]({png})" in text and (tmp_path / "out" / png).stat().st_size > 1000


def test_report_tolerates_missing_and_odd_results(tmp_path):
    from mechray.analysis.report import write_report

    doc = {"store": "x", "layers": {"a": {"rows": 1}}, "results": {
        "sae": {"a": {"skipped": True, "reason": "why not"}},
        "causal": {"a": {"ranked": [{"neuron": 3, "effect": 0.5}], "layer_effect": 1.0}},
        "feature": {"a": {"explained_variance_ratio": "garbage"}}}}
    text = write_report(doc, tmp_path).read_text()
    assert "why not" in text and "causal_effects.png" in text and "## feature" in text


def test_seed_pattern_3_as_written(tiny_net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_net
    config = MechIntConfig(sample_layers=LAYERS, use_ray=False, verbose=False,
                           analysis_params={"sae": {"steps": 5, "batch_size": 16}})
    capture(model, "./mechint_cache", steps=[0, 200])
    torch.save(model.state_dict(), "./model.pt")
    with torch.no_grad():
        model.popt.weight.zero_()                       # the checkpoint must restore it

    runner = EvalMechIntRunner(model, config)
    results = runner.run_mechint_eval(
        checkpoint_path='./model.pt',
        hidden_shards_path='./mechint_cache'
    )
    runner.export_results('./results')

    assert model.popt.weight.abs().sum() > 0
    assert list(results) == ["sae", "neuron"]
    for layer in LAYERS:
        assert results["neuron"][layer]["num_samples"] == 2 * 15       # 2 steps x [3, 5] rows
        assert layer in results["sae"]
    assert (tmp_path / "results" / "mechint_results.json").is_file()
    assert (tmp_path / "results" / "mechint_report.md").is_file()


class _Seed(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(4, 8)
        self.layer2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.layer2(torch.relu(self.layer1(x)))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_seed_example_2_full_pipeline_and_lightning_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = _Seed()
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 2))
    dataloader = DataLoader(data, batch_size=16)

    # 1. Train with hooks
    config = MechIntConfig(sample_layers=['layer1', 'layer2'])
    trainer = pl.Trainer(callbacks=[MechIntCallback(config)], max_steps=3, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, dataloader)

    # 2. Analyze
    runner = EvalMechIntRunner(model, config)
    results = runner.run_mechint_eval(hidden_shards_path='./mechint_cache')

    # 3. Export
    runner.export_results('./results')

    assert results["neuron"]["layer1"]["num_samples"] == 16
    assert set(results["sae"]) == {"layer1", "layer2"}
    assert json.loads((tmp_path / "results" / "mechint_results.json").read_text())["results"]
    trainer.save_checkpoint("model.ckpt")               # a real Lightning checkpoint
    saved = model.layer1.weight.detach().clone()
    with torch.no_grad():
        model.layer1.weight.zero_()
    EvalMechIntRunner(model, config.model_copy(update={"analyses_to_run": ["neuron"]})) \
        .run_mechint_eval(checkpoint_path="model.ckpt", hidden_shards_path="./mechint_cache")
    assert torch.equal(model.layer1.weight, saved)


def test_eval_data_dataloader_and_bad_checkpoint(tiny_net, tmp_path):
    config = capture(tiny_net, tmp_path / "s", analyses_to_run=["neuron"])
    runner = EvalMechIntRunner(tiny_net, config)
    loader = DataLoader(TensorDataset(torch.randn(10, 5, 6), torch.zeros(10)), batch_size=4)
    runner.run_mechint_eval(eval_data=loader)
    assert runner.meta["eval_inputs"] == [10, 5, 6] and runner.meta["eval_inputs_source"] == \
        "eval_data"
    torch.save({"state_dict": {"nope": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="does not fit TinyNet"):
        runner.run_mechint_eval(checkpoint_path=str(tmp_path / "bad.ckpt"))


def test_cli_analyze(tiny_net, tmp_path, capsys):
    capture(tiny_net, tmp_path / "s")
    rc = cli_main(["analyze", str(tmp_path / "s"), "--analyses", "neuron,feature", "--out",
                   str(tmp_path / "out"), "-q", "--params", json.dumps(FAST)])
    out = capsys.readouterr().out
    assert rc == 0 and "report:" in out and "neuron    2/2" in out
    doc = json.loads((tmp_path / "out" / "mechint_results.json").read_text())
    assert doc["results"]["feature"]["popt"]["n_components"] == 3
    assert cli_main(["analyze", str(tmp_path / "s"), "--analyses", "nueron", "-q",
                     "--out", str(tmp_path / "o2")]) == 2
    assert "did you mean 'neuron'" in capsys.readouterr().err


# --- S3 and Ray (Ray last: its fixture lives until the module ends) ----------------------------
def _s3_capture(tiny_net, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    capture(tiny_net, tmp_path / "local", storage_backend="both", s3_bucket=bucket,
            s3_prefix="exp/acts", s3_endpoint_url=endpoint)
    return endpoint, f"s3://{bucket}/exp/acts"


def test_s3_hosted_shards_analyse_like_local_ones(tiny_net, tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("MECHRAY_CACHE_DIR", str(tmp_path / "cache"))
    endpoint, uri = _s3_capture(tiny_net, tmp_path, s3_bucket)
    names = ["neuron", "feature", "dynamics"]
    remote = engine(uri, endpoint_url=endpoint).run(names, FAST)
    local = engine(tmp_path / "local").run(names, FAST)
    close(remote, local)
    config = MechIntConfig(sample_layers=LAYERS, storage_backend="s3", s3_bucket=uri.split("/")[2],
                           s3_prefix="exp/acts", s3_endpoint_url=endpoint, use_ray=False,
                           verbose=False, analyses_to_run=["neuron"])
    runner = EvalMechIntRunner(None, config)
    assert runner.run_mechint_eval()["neuron"] == local["neuron"]     # default location: S3
    assert runner.meta["store"] == uri


def test_ray_and_in_process_results_are_equal(ray_local, tiny_net, tmp_path):
    capture(tiny_net, tmp_path / "s", steps=[0, 1, 2, 3, 4])
    names = ["neuron", "feature", "dynamics"]
    alone = engine(tmp_path / "s", out_dir=tmp_path / "a").run(names, FAST)
    fanned = Engine(str(tmp_path / "s"), use_ray=True, progress=False,
                    out_dir=tmp_path / "b").run(names, FAST)
    close(fanned, alone)
    assert fanned["neuron"] == alone["neuron"]
    for layer in LAYERS:
        rel = alone["feature"][layer]["components_path"]
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_ray_reads_s3_and_reports_corrupt_shards(ray_local, tiny_net, tmp_path, s3_bucket):
    endpoint, uri = _s3_capture(tiny_net, tmp_path, s3_bucket)
    from mechray.storage.reader import ShardStore

    store = ShardStore(uri, endpoint_url=endpoint, cache_dir=str(tmp_path / "cache"))
    fanned = Engine(store, use_ray=True, progress=False).run(["neuron", "feature"], FAST)
    local = engine(tmp_path / "local").run(["neuron", "feature"], FAST)
    close(fanned, local)
    assert (tmp_path / "cache" / "s3").is_dir()                 # workers used the driver's cache
    victim = sorted((tmp_path / "local").glob("*_step_1.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ShardError, match=victim.name):
        Engine(str(tmp_path / "local"), use_ray=True, progress=False).run(["neuron"])


def test_all_six_analyses_end_to_end_on_ray(ray_local, tmp_path):
    """The peers' sae/causal/circuit through the registry, fanned out with the model on Ray."""
    from mechray.demo.model import NeuroFMX

    torch.manual_seed(0)
    model = NeuroFMX(n_neurons=6, d_model=8, n_blocks=2)
    layers = ["mamba_backbone.blocks.1", "popt"]
    params = {**FAST, "sae": {"steps": 5, "batch_size": 16, "expansion_factor": 2, "k": 2},
              "causal": {"n_inputs": 8}, "circuit": {"n_inputs": 8, "check_neurons": 2}}
    names = ["neuron", "feature", "sae", "causal", "circuit", "dynamics"]
    config = MechIntConfig(sample_layers=layers, storage_path=str(tmp_path / "s"), use_ray=False,
                           verbose=False, save_inputs=True, analyses_to_run=names,
                           analysis_params=params)
    with MechIntHooks(config).attach(model) as hooks:
        for step in (0, 1, 2):
            with torch.no_grad():
                model(torch.poisson(torch.ones(4, 5, 6)))
            hooks.sampler.save_activations(step)
    runner = EvalMechIntRunner(model, config.model_copy(update={"use_ray": None}))
    results = runner.run_mechint_eval()
    report = runner.export_results(tmp_path / "out")
    assert runner.meta["used_ray"] and list(results) == names
    for name in names:
        for layer in layers:
            assert not results[name][layer].get("skipped"), (name, layer, results[name][layer])
    for layer in layers:
        assert (tmp_path / "out" / results["sae"][layer]["weights_path"]).is_file()
        effects = [e["effect"] for e in results["causal"][layer]["ranked"]]
        assert effects == sorted(effects, reverse=True)
    text = report.read_text()
    assert all(f"## {n}" in text for n in names) and "causal_effects.png" in text


def test_model_not_importable_on_workers_runs_in_the_driver(ray_local, tiny_net, tmp_path,
                                                            caplog):
    config = capture(tiny_net, tmp_path / "s", analyses_to_run=["neuron", "causal"],
                     analysis_params={"causal": {"n_inputs": 4}})
    with caplog.at_level("WARNING", logger="mechray"):
        results = EvalMechIntRunner(tiny_net, config.model_copy(update={"use_ray": True})) \
            .run_mechint_eval()
    assert "run in the driver" in caplog.text and "conftest" in caplog.text  # TinyNet's module
    assert all(not r.get("skipped") for r in results["causal"].values())
