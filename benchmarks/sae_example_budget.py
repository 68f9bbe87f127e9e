"""The example's SAE (both MiniLM layers of examples/transformers_text.py's store) under a given
budget: held-out EV, steps, warnings, wall and CPU seconds.  Run two budgets side by side.

Usage::

    python examples/transformers_text.py --out /tmp/tt_out        # the store, once
    python benchmarks/sae_example_budget.py /tmp/tt_out/mechint_cache '{"expansion_factor": 4, "k": 16}'
"""
import json
import sys
import time

from mechray import ShardStore
from mechray.analysis.engine import Engine

store = ShardStore(sys.argv[1])
params = json.loads(sys.argv[2])
t0, c0 = time.time(), time.process_time()
eng = Engine(store, use_ray=False, progress=False)
res = eng.run(["sae"], {"sae": dict(params, save_weights=False)},
              layers=["encoder.layer.3", "encoder.layer.5"])
for la, r in res["sae"].items():
    print(la, f"ev {r['explained_variance']:.3f}",
          f"train_ev {r.get('train_explained_variance', float('nan')):.3f}",
          "steps", r["train"]["steps"], "epochs", r["train"]["epochs"], "warnings", r["warnings"])
print(f"wall {time.time() - t0:.1f} cpu {time.process_time() - c0:.1f}")
