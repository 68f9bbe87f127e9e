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
analysis's validated ``Params`` instance, as the planner has it (a dict is validated first).
"""

from __future__ import annotations

from typing import Any

from mechray.analysis.base import JSON_NUMBER, REGISTRY, Cost, Workload, analysis_names

__all__ = ["Cost", "Workload", "answer_bytes", "estimate"]


def estimate(analysis: str, p: Any, w: Workload) -> Cost:
    """Operations and peak bytes of one analysis on one layer: the registered class's ``cost``
    (an analysis that declares none: a full pass over the rows)."""
    analysis_names()
    cls = REGISTRY.get(analysis)
    return cls.cost(cls.validate_params(p), w) if cls is not None else \
        Cost(float(w.rows) * w.d * 10, float(w.shard_rows) * w.d * 8 * 3)


def answer_bytes(analysis: str, p: Any, w: Workload) -> float:
    """Bytes of one layer's JSON answer, which grows with the features per row (a 1-D upload of
    10^6 values is one row of 10^6 features): the registered class's ``answer_bytes``."""
    analysis_names()
    cls = REGISTRY.get(analysis)
    return float(cls.answer_bytes(cls.validate_params(p), w)) if cls is not None else \
        JSON_NUMBER * w.d * 8 + 65536

