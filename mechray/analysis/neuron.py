"""``neuron``: exact per-neuron statistics over every stored row of a layer.

Usage::

    from mechray.analysis import get_analysis

    neuron = get_analysis("neuron", {"eps": 1e-6, "top_k": 5})
    partial = None
    for entry, rows in store.iter_layer("popt"):          # or Ray tasks over shards (engine.py)
        p = neuron.map(rows, entry, "popt")
        partial = p if partial is None else neuron.merge(partial, p)
    result = neuron.finalize(partial, ctx, "popt")
    result["mean"], result["std"], result["sparsity"], result["top_k"]["shard"][neuron_index]

Per neuron: ``mean``, ``std`` (population, ``ddof=0`` as numpy), ``min``, ``max``, ``sparsity``
(fraction of rows with ``|a| <= eps``), ``fraction_positive``; per layer: ``num_samples``,
``dead_count``/``dead_neurons`` (neurons with ``|a| <= eps`` on every row), a histogram of all
values on fixed signed log-spaced bins, and the ``top_k`` max-activating rows of every neuron
with their shard file, row in that shard and training step.

Partials are exact and order-independent: float64 mean and second moment merged with Chan's
parallel formula (no cancellation for large, near-equal means), counts added, top-k candidates
re-ranked by (value desc, shard file, row) so ties resolve the same way whatever the merge tree.
``map`` reads the step of each row from ``entry["row_steps"]`` (a per-layer int tensor the engine
adds from the shard's metadata) and falls back to ``entry["step"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from mechray.analysis.base import Analysis, Context, Params, register

# Fixed histogram edges: 0, then +-10^-4 .. +-10^4 with 4 bins per decade; outliers go to the ends.
_MAG = 10.0 ** np.linspace(-4, 4, 33)
EDGES = np.concatenate([-_MAG[::-1], [0.0], _MAG])


class NeuronParams(Params):
    eps: float = Field(1e-6, ge=0.0, le=1e3, description="|a| <= eps counts as inactive")
    top_k: int = Field(5, ge=1, le=1000, description="max-activating rows kept per neuron")


@register
class NeuronStats(Analysis):
    """Exact mergeable per-neuron statistics (kind ``stat``)."""

    name = "neuron"
    kind = "stat"
    Params = NeuronParams

    def map(self, rows: torch.Tensor, entry: dict[str, Any], layer: str) -> dict[str, Any]:
        x = rows.reshape(len(rows), -1).to(torch.float64)
        n, d = x.shape
        if n == 0:
            return _empty(d)
        mean = x.mean(0)
        vals, rows_idx = _topk_rows(x, min(self.params.top_k, n))
        steps = entry.get("row_steps")
        steps = (np.asarray(steps, dtype=np.int64)[rows_idx] if steps is not None and
                 len(steps) == n else np.full(rows_idx.shape, int(entry.get("step", -1))))
        flat = x.reshape(-1).clamp(EDGES[0], EDGES[-1])
        bins = torch.bucketize(flat, torch.from_numpy(EDGES[1:-1]), right=True)
        return {
            "n": n, "mean": mean.numpy(), "m2": ((x - mean) ** 2).sum(0).numpy(),
            "min": x.amin(0).numpy(), "max": x.amax(0).numpy(),
            "small": (x.abs() <= self.params.eps).sum(0).numpy(),
            "pos": (x > 0).sum(0).numpy(),
            "hist": torch.bincount(bins, minlength=len(EDGES) - 1).numpy(),
            "files": [entry["file"]], "top_val": vals, "top_file": np.zeros_like(rows_idx),
            "top_row": rows_idx, "top_step": steps,
        }

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if a["n"] == 0 or b["n"] == 0:
            return b if a["n"] == 0 else a
        n = a["n"] + b["n"]
        delta = b["mean"] - a["mean"]
        files = sorted(set(a["files"]) | set(b["files"]))
        where = {f: i for i, f in enumerate(files)}
        remap = [np.asarray([where[f] for f in p["files"]], dtype=np.int64) for p in (a, b)]
        val = np.concatenate([a["top_val"], b["top_val"]])
        fil = np.concatenate([remap[0][a["top_file"]], remap[1][b["top_file"]]])
        row = np.concatenate([a["top_row"], b["top_row"]])
        stp = np.concatenate([a["top_step"], b["top_step"]])
        order = np.lexsort((row, fil, -val), axis=0)[: self.params.top_k]
        pick = lambda arr: np.take_along_axis(arr, order, axis=0)  # noqa: E731
        return {
            "n": n, "mean": a["mean"] + delta * (b["n"] / n),
            "m2": a["m2"] + b["m2"] + delta ** 2 * (a["n"] * b["n"] / n),
            "min": np.minimum(a["min"], b["min"]), "max": np.maximum(a["max"], b["max"]),
            "small": a["small"] + b["small"], "pos": a["pos"] + b["pos"],
            "hist": a["hist"] + b["hist"],
            "files": files, "top_val": pick(val), "top_file": pick(fil), "top_row": pick(row),
            "top_step": pick(stp),
        }

    def finalize(self, partial: dict[str, Any], ctx: Context, layer: str) -> dict[str, Any]:
        n = partial["n"]
        if n == 0:
            from mechray.analysis.base import Skip

            raise Skip(f"layer {layer!r} has no stored rows")
        sparsity = partial["small"] / n
        dead = np.flatnonzero(partial["small"] == n)
        files = np.asarray(partial["files"], dtype=object)
        tr = lambda arr: arr.T.tolist()  # noqa: E731  ([d][k]: neuron-major)
        return {
            "num_samples": int(n), "num_neurons": int(len(partial["mean"])),
            "eps": self.params.eps,
            "mean": partial["mean"].tolist(), "std": np.sqrt(partial["m2"] / n).tolist(),
            "min": partial["min"].tolist(), "max": partial["max"].tolist(),
            "sparsity": sparsity.tolist(), "fraction_positive": (partial["pos"] / n).tolist(),
            "dead_count": int(len(dead)), "dead_neurons": dead.tolist(),
            "histogram": {"edges": EDGES.tolist(), "counts": partial["hist"].tolist()},
            "top_k": {"k": int(partial["top_val"].shape[0]), "values": tr(partial["top_val"]),
                      "shard": tr(files[partial["top_file"]]), "row": tr(partial["top_row"]),
                      "step": tr(partial["top_step"])},
        }


def _topk_rows(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k largest values and their rows; ties go to the lowest row (deterministic).

    Returns ``(values[k, d], rows[k, d])`` ordered by (value desc, row asc).
    """
    x = torch.nan_to_num(x, nan=-torch.inf)                # NaN never ranks as "max-activating"
    kth = torch.topk(x, k, dim=0).values[-1]               # the k-th largest value per column
    above = x > kth
    tied = x == kth
    need = k - above.sum(0)                                # how many tied rows each column takes
    chosen = above | (tied & (tied.cumsum(0) <= need))     # exactly k rows per column
    col, row = chosen.T.nonzero(as_tuple=True)             # column-major: rows ascending
    rows = row.reshape(x.shape[1], k).T.numpy()
    vals = x.numpy()[rows, np.arange(x.shape[1])[None, :]]
    order = np.lexsort((rows, -vals), axis=0)
    return np.take_along_axis(vals, order, 0), np.take_along_axis(rows, order, 0)


def _empty(d: int) -> dict[str, Any]:
    z = np.zeros(d)
    return {"n": 0, "mean": z, "m2": z, "min": z, "max": z, "small": z.astype(np.int64),
            "pos": z.astype(np.int64), "hist": np.zeros(len(EDGES) - 1, dtype=np.int64),
            "files": [], "top_val": np.zeros((0, d)), "top_file": np.zeros((0, d), np.int64),
            "top_row": np.zeros((0, d), np.int64), "top_step": np.zeros((0, d), np.int64)}
