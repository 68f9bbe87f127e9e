"""Analyses that hook one in-process model take turns (concurrent API requests, say)."""

import threading

import torch

from mechray import ActivationSampler
from mechray.analysis.engine import Engine


def test_concurrent_model_analyses_on_one_model_do_not_interfere(tiny_net, tmp_path):
    with ActivationSampler(layers=["mamba_backbone.blocks.1", "popt"], save_dir=str(tmp_path),
                           use_ray=False, save_inputs=True).attach(tiny_net) as s:
        for step in range(2):
            tiny_net(torch.randn(8, 5, 6))
            s.save_activations(step)
    results, errors = [], []

    def run(name):
        try:
            for _ in range(3):
                results.append(Engine(str(tmp_path), use_ray=False, progress=False).run(
                    [name], {name: {"n_inputs": 8}}, model=tiny_net))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("causal", "circuit") * 2]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(results) == 12
    for res in results:
        for name, per_layer in res.items():
            for layer, out in per_layer.items():
                assert not out.get("skipped"), (name, layer, out.get("reason"))
    assert sum(len(m._forward_hooks) for m in tiny_net.modules()) == 0
