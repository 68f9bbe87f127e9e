"""The ``sae`` analysis at its defaults on MiniLM's real rows: time, held-out EV, EV on new text.

Usage::

    .venv/bin/python benchmarks/sae_minilm.py --quick          # encoder.layer.3, variant "after"
    .venv/bin/python benchmarks/sae_minilm.py                  # both layers, "after" + "old-data"
    .venv/bin/python benchmarks/sae_minilm.py --variants before   # the old budget (~1 h a layer)

Rows: ``--sentences`` (300) sentences through MiniLM (all-MiniLM-L6-v2, d 384, offline) with
:class:`MechIntHooks`, stored per layer; then ``get_analysis("sae", params).fit(...)`` per layer
at the library's defaults (expansion 8: 3,072 latents, k 32) and, on rows of ``--sentences``
*new* sentences never stored (another seed, none shared), the EV of the SAE it saved.  Columns:
wall and CPU seconds of the fit (the CPU seconds of this process, all threads: the machine is
shared, so wall time depends on the load), steps, epochs, the budget rule, EV on training rows,
on held-out rows and on the new sentences, and the warnings.

Variants:

- ``after``: distinct sentences (``varied_sentences``), special tokens left out of capture
  (``MechIntHooks(config, tokenizer=tok)``), the budget now (``max_epochs=50``, early stop);
- ``old-data``: the sentences the example used before (``sentences``: 40 clauses, so many
  repeat) with [CLS]/[SEP] rows stored, the budget now: what the data alone changes;
- ``before``: ``old-data`` with the old budget (``max_epochs=None, early_stop=False``: 6,144
  steps over ~5,600 rows, ~1,000 epochs; an hour a layer on this machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_logging, table, write_json  # noqa: E402

LAYERS = ["encoder.layer.3", "encoder.layer.5"]
VARIANTS = {"after": (True, {}), "old-data": (False, {}),
            "before": (False, {"max_epochs": None, "early_stop": False})}


def capture(model, tok, texts, path, layers, varied):
    import torch

    from mechray import MechIntConfig, MechIntHooks

    config = MechIntConfig(sample_layers=layers, storage_path=str(path), use_ray=False,
                           verbose=False, max_activations_per_shard=100_000)
    with MechIntHooks(config, tokenizer=tok if varied else None).attach(model) as hooks, \
            torch.no_grad():
        for step, i in enumerate(range(0, len(texts), 32)):
            model(**tok(texts[i:i + 32], padding=True, return_tensors="pt"))
            hooks.save_activations(step)


def new_rows(model, tok, texts, layers, varied):
    """Rows of each layer on ``texts`` (real tokens; special ones out when ``varied``)."""
    import torch

    special = torch.tensor(tok.all_special_ids)
    out = {la: [] for la in layers}
    handles = [model.get_submodule(la).register_forward_hook(
        lambda m, a, o, la=la: out[la].append(o[0] if isinstance(o, tuple) else o))
        for la in layers]
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 32):
                enc = tok(texts[i:i + 32], padding=True, return_tensors="pt")
                keep = enc["attention_mask"].bool()
                if varied:
                    keep &= ~torch.isin(enc["input_ids"], special)
                model(**enc)
                for la in layers:
                    out[la][-1] = out[la][-1][keep]
    finally:
        for h in handles:
            h.remove()
    return {la: torch.cat(v).float() for la, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="encoder.layer.3 only, variant after")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--variants", default=None, help="comma-separated: after,old-data,before")
    ap.add_argument("--params", default="{}", help="JSON SAE params on top of the defaults")
    args = ap.parse_args()
    setup_logging()
    import json

    from mechray import ShardStore
    from mechray.analysis import Context, get_analysis
    from mechray.analysis.sae.budget import fvu
    from mechray.analysis.sae.model import load_sae
    from mechray.demo.text import load_minilm, sentences, varied_sentences

    layers = LAYERS[:1] if args.quick else LAYERS
    variants = (args.variants or ("after" if args.quick else "after,old-data")).split(",")
    model, tok = load_minilm()
    rows = []
    for variant in variants:
        varied, budget = VARIANTS[variant]
        if varied:
            train = varied_sentences(args.sentences)
            new = varied_sentences(args.sentences, seed=1, exclude=frozenset(train))
        else:
            train = sentences(args.sentences)
            new = [t for t in sentences(4 * args.sentences, seed=1) if t not in set(train)]
            new = new[: args.sentences]
        with tempfile.TemporaryDirectory() as tmp:
            capture(model, tok, train, Path(tmp) / "store", layers, varied)
            store = ShardStore(Path(tmp) / "store")
            fresh = new_rows(model, tok, new, layers, varied)
            for layer in layers:
                params = {**budget, **json.loads(args.params)}
                c0, w0 = time.process_time(), time.perf_counter()
                r = get_analysis("sae", params).fit(
                    Context(store=store, out_dir=Path(tmp) / "out"), layer)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                sae = load_sae(Path(tmp) / "out" / r["weights_path"])
                t = r["train"]
                rows.append({
                    "variant": variant, "layer": layer, "rows": store.layers()[layer]["rows"],
                    "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": t["steps"],
                    "epochs": t["epochs"], "budget": t["budget"],
                    "train_ev": round(r["train_explained_variance"], 3),
                    "heldout_ev": round(r["explained_variance"], 3),
                    "new_text_ev": round(1 - fvu(sae, fresh[layer]), 3),
                    "converged": r["converged"],
                    "stopped_at": (t["early_stop"] or {}).get("stopped_at"),
                    "warnings": r["warnings"]})
                print(table([rows[-1]], ["variant", "layer", "rows", "wall_s", "cpu_s", "steps",
                                         "epochs", "train_ev", "heldout_ev", "new_text_ev",
                                         "converged", "stopped_at"]), flush=True)
    print(table(rows, ["variant", "layer", "rows", "wall_s", "cpu_s", "steps", "epochs",
                       "train_ev", "heldout_ev", "new_text_ev", "converged", "stopped_at"]))
    for r in rows:
        print(f"{r['variant']} {r['layer']}: budget {r['budget']}; warnings {r['warnings']}")
    write_json("sae_minilm", {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
