"""What an API request would cost: rough operation and peak-memory estimates per analysis.

Usage::

    from mechray.api.cost import Workload, estimate

    cost = estimate("feature", params, Workload(rows=10_000, d=512, shard_rows=2_000, steps=4))
    cost.ops, cost.bytes       # the request runs as a job over config.api_job_cost ops, and is
                               # refused over config.api_max_cost / api_max_memory_mb
    answer_bytes("neuron", params, workload)   # its JSON answer: refused over api_max_answer_mb

Each analysis declares its own ``cost`` (:meth:`mechray.analysis.base.Analysis.cost`); the figures
are orders of magnitude (multiply-adds, bytes), enough to keep one request from
exhausting a server's CPU or memory and to send long ones to the job queue; ``params`` are the
analysis's validated, complete parameters (``Params.model_dump()``).
"""

from __future__ import annotations

from typing import Any

from mechray.analysis.base import REGISTRY, Cost, Workload, analysis_names

__all__ = ["Cost", "Workload", "answer_bytes", "estimate"]
NUMBER = 22.0       # bytes one float takes in a JSON answer, with its separator


def estimate(analysis: str, p: dict[str, Any], w: Workload) -> Cost:
    """Operations and peak bytes of one analysis on one layer: the registered class's ``cost``
    (an analysis that declares none: a full pass over the rows)."""
    analysis_names()
    cls = REGISTRY.get(analysis)
    return cls.cost(p, w) if cls is not None else Cost(float(w.rows) * w.d * 10,
                                                       float(w.shard_rows) * w.d * 8 * 3)


def answer_bytes(analysis: str, p: dict[str, Any], w: Workload) -> float:
    """Bytes of one layer's JSON answer, which grows with the features per row (a 1-D upload of
    10^6 values is one row of 10^6 features).  An analysis class may declare its own
    ``answer_bytes(params, workload)``; otherwise about 8 numbers per feature, and for the
    built-in analyses whose answers hold more per feature (top-k rows, components, latents)
    their own figure."""
    analysis_names()
    declared = getattr(REGISTRY.get(analysis), "answer_bytes", None)
    if callable(declared):
        return float(declared(p, w))
    d = float(w.d)
    if analysis == "neuron":                    # 6 stats, dead list, 4 top-k lists per neuron
        return NUMBER * d * (8 + 4 * p.get("top_k", 5)) + 4096
    if analysis == "feature":                   # components [k, d], per-component stats
        return NUMBER * (p.get("n_components", 10) * (d + 3) + p.get("n_clusters", 8)) + 4096
    if analysis == "sae":                       # a few statistics per latent
        latents = float(p.get("n_latents") or p.get("expansion_factor", 8) * d)
        return NUMBER * latents * 4 + 65536
    return NUMBER * d * 8 + 65536
