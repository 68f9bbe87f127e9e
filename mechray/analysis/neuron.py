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

import functools
from typing import Any

import numpy as np
import torch
from pydantic import Field

from mechray.analysis.base import Analysis, Context, Cost, Params, Workload, register
from mechray.analysis.moments import Moments
from mechray.analysis.render import grid, mean_of

# Fixed histogram edges: 0, then +-10^-4 .. +-10^4 with 4 bins per decade; outliers go to the ends.
_MAG = 10.0 ** np.linspace(-4, 4, 33)
EDGES = np.concatenate([-_MAG[::-1], [0.0], _MAG])


CHUNK = 1 << 16  # rows per block in map(): bounds the float64 temporaries of very tall shards


class NeuronParams(Params):
    eps: float = Field(1e-6, ge=0.0, le=1e3, description="|a| <= eps counts as inactive")
    top_k: int = Field(5, ge=1, le=1000, description="max-activating rows kept per neuron")


@register
class NeuronStats(Analysis):
    """Exact mergeable per-neuron statistics (kind ``stat``)."""

    name = "neuron"
    kind = "stat"
    Params = NeuronParams
    summary = "per-neuron mean, std, min, max, sparsity, histogram and top-activating rows"
    columns = (("samples", lambda r: r["num_samples"]), ("neurons", lambda r: r["num_neurons"]),
               ("mean sparsity", mean_of("sparsity")), ("dead", lambda r: r["dead_count"]),
               ("mean std", mean_of("std")), ("max", lambda r: max(r["max"])))
    plot_file = "neuron_activations.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        fig, axes = grid(plt, len(per), 2)
        for (layer, r), (a, b) in zip(per.items(), axes):
            edges = np.asarray(r["histogram"]["edges"])
            counts = np.asarray(r["histogram"]["counts"])
            used = np.flatnonzero(counts)
            lo, hi = (used[0], used[-1] + 1) if len(used) else (0, len(counts))
            a.stairs(counts[lo:hi], edges[lo:hi + 1], fill=True)
            a.set_xscale("symlog", linthresh=1e-3)
            extent = max(abs(edges[lo]), abs(edges[hi]))
            ticks = [t for t in (1e-2, 1, 1e2, 1e4) if t <= extent * 1.01]
            a.set_xticks([-t for t in ticks[::-1]] + [0] + ticks)
            a.tick_params(axis="x", labelsize=7)
            a.set_title(f"{layer}: activation values", fontsize=9)
            a.set_ylabel("rows x neurons", fontsize=8)
            b.hist(r["sparsity"], bins=20, range=(0, 1))
            b.set_title(f"{layer}: sparsity per neuron", fontsize=9)
            b.set_xlabel("fraction |a| <= eps", fontsize=8)
        fig.tight_layout()
        return fig

    @classmethod
    def cost(cls, p: dict[str, Any], w: Workload) -> Cost:
        return Cost(float(w.rows) * w.d * 12,
                    float(w.shard_rows) * w.d * 8 * 3 + p.get("top_k", 5) * w.d * 40)

    def map(self, rows: torch.Tensor, entry: dict[str, Any], layer: str) -> dict[str, Any]:
        """Statistics of one shard's rows, computed in blocks of :data:`CHUNK` rows merged
        exactly: float64 temporaries stay small enough for the allocator to reuse (whole-shard
        temporaries cost a page fault per 4 KiB, which dominated the time)."""
        flat = rows.reshape(len(rows), -1)
        total = len(flat)
        if total <= CHUNK:
            return self._map_block(flat, entry, 0, total)
        return functools.reduce(self.merge, (self._map_block(flat[i:i + CHUNK], entry, i, total)
                                             for i in range(0, total, CHUNK)))

    def _map_block(self, rows: torch.Tensor, entry: dict[str, Any], offset: int,
                   total: int) -> dict[str, Any]:
        n, d = rows.shape
        if n == 0:
            return _empty(d)
        if not rows.is_floating_point():
            rows = rows.to(torch.float64)
        x = rows.to(torch.float64)          # sums in float64; comparisons on the stored dtype
        moments = Moments.of(x)             # (widening is exact, so they agree with float64)
        vals, rows_idx = _topk_rows(rows, min(self.params.top_k, n))
        rows_idx = rows_idx + offset
        steps = entry.get("row_steps")
        steps = (np.asarray(steps, dtype=np.int64)[rows_idx] if steps is not None and
                 len(steps) == total else np.full(rows_idx.shape, int(entry.get("step", -1))))
        lo, hi = torch.aminmax(rows, dim=0)
        eps = self.params.eps
        bins = np.searchsorted(EDGES[1:-1], rows.reshape(-1).float().numpy(), side="right")
        return {
            "n": n, "moments": moments,
            "min": lo.double().numpy(), "max": hi.double().numpy(),
            "small": ((x <= eps) & (x >= -eps)).sum(0).numpy(),
            "pos": (rows > 0).sum(0).numpy(),
            "hist": np.bincount(bins, minlength=len(EDGES) - 1),
            "files": [entry["file"]], "top_val": vals, "top_file": np.zeros_like(rows_idx),
            "top_row": rows_idx, "top_step": steps,
        }

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if a["n"] == 0 or b["n"] == 0:
            return b if a["n"] == 0 else a
        n = a["n"] + b["n"]
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
            "n": n, "moments": a["moments"].merge(b["moments"]),
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
            "num_samples": int(n), "num_neurons": int(len(partial["moments"].mean)),
            "eps": self.params.eps,
            "mean": partial["moments"].mean.tolist(),
            "std": np.sqrt(partial["moments"].variance()).tolist(),
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

    Returns ``(values[k, d], rows[k, d])`` (float64, int64) ordered by (value desc, row asc).
    ``torch.topk`` picks the set; only columns where rows tied with the k-th value were left
    out (rare for real activations) are redone exactly.
    """
    x = torch.nan_to_num(x, nan=-torch.inf)                # NaN never ranks as "max-activating"
    vals, rows = torch.topk(x, k, dim=0)
    kth = vals[-1]
    left_out = (x == kth).sum(0) > (vals == kth).sum(0)    # a tie at the k-th value was cut
    if left_out.any():
        cols = left_out.nonzero().flatten()
        sub = x[:, cols]
        above, tied = sub > kth[cols], sub == kth[cols]
        need = k - above.sum(0)
        chosen = above | (tied & (tied.cumsum(0) <= need))   # exactly k rows per column
        _, row = chosen.T.nonzero(as_tuple=True)              # column-major: rows ascending
        rows[:, cols] = row.reshape(len(cols), k).T
    rows_np = rows.numpy()
    vals_np = x.double().numpy()[rows_np, np.arange(x.shape[1])[None, :]]
    order = np.lexsort((rows_np, -vals_np), axis=0)
    return np.take_along_axis(vals_np, order, 0), np.take_along_axis(rows_np, order, 0)


def _empty(d: int) -> dict[str, Any]:
    z = np.zeros(d)
    return {"n": 0, "moments": Moments.empty(d), "min": z, "max": z, "small": z.astype(np.int64),
            "pos": z.astype(np.int64), "hist": np.zeros(len(EDGES) - 1, dtype=np.int64),
            "files": [], "top_val": np.zeros((0, d)), "top_file": np.zeros((0, d), np.int64),
            "top_row": np.zeros((0, d), np.int64), "top_step": np.zeros((0, d), np.int64)}
