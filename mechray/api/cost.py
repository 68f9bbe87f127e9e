"""What an API request would cost: rough operation and peak-memory estimates per analysis.

Usage::

    from mechray.api.cost import Workload, estimate

    cost = estimate("feature", params, Workload(rows=10_000, d=512, shard_rows=2_000, steps=4))
    cost.ops, cost.bytes       # the request runs as a job over config.api_job_cost ops, and is
                               # refused over config.api_max_cost / api_max_memory_mb

The figures are orders of magnitude (multiply-adds, bytes), enough to keep one request from
exhausting a server's CPU or memory and to send long ones to the job queue; ``params`` are the
analysis's validated, complete parameters (``Params.model_dump()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Workload:
    rows: int               # stored rows of the layer (all shards)
    d: int                  # features per row
    shard_rows: int         # rows of the largest shard (what is in memory at once)
    steps: int = 1          # saved steps holding the layer
    model_params: int = 0   # parameters of the served model (0: none)
    layers: int = 1         # captured layers (circuit path patching)
    inputs: int = 256       # model inputs available at most (config.eval_max_samples)


@dataclass(frozen=True)
class Cost:
    ops: float
    bytes: float


def estimate(analysis: str, p: dict[str, Any], w: Workload) -> Cost:
    """Operations and peak bytes of one analysis on one layer (unknown analyses: a full pass)."""
    n, d, shard = float(w.rows), float(w.d), float(w.shard_rows)
    read = shard * d * 8 * 3                                  # one shard as float64, twice over
    if analysis == "neuron":
        return Cost(n * d * 12, read + p.get("top_k", 5) * d * 40)
    if analysis == "feature":
        km = n * d * p.get("n_clusters", 8) * (p.get("kmeans_epochs", 1) + 1)
        return Cost(n * d * d + km + d ** 3,
                    read + d * d * 8 * 3 + p.get("sample_size", 2000) * d * 4 * 2)
    if analysis == "dynamics":
        return Cost(n * d * d + w.steps * d ** 3, read + (w.steps + 2) * d * d * 8)
    if analysis == "sae":
        latents = float(p.get("n_latents") or p.get("expansion_factor", 8) * d)
        rows = float(min(n, p.get("max_rows") or n))
        seen = p["steps"] * p.get("batch_size", 4096) if p.get("steps") else \
            rows * p.get("epochs", 1)
        batch = float(min(p.get("batch_size", 4096), max(rows, 1)))
        buffer = min(rows * d * 4, p.get("buffer_mb", 512) * 2 ** 20)
        return Cost(6 * seen * latents * d, latents * d * 4 * 5 + batch * latents * 4 * 4 + buffer)
    if analysis in ("causal", "circuit"):
        forward = 2.0 * max(w.model_params, 1) * min(p.get("n_inputs", 256), w.inputs)
        if analysis == "causal":
            passes = min(p.get("top_n", 64), d) + 2
        else:
            passes = (d if p.get("method") == "exact" else p.get("check_neurons", 16)) + 4 + \
                (w.layers if p.get("paths", True) else 0)
        acts = p.get("batch_size", 64) * p.get("neuron_batch", 16) * d * 4 * 8
        return Cost(forward * passes, w.model_params * 4 * 4 + acts + read)
    return Cost(n * d * 10, read)
