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

``map`` finds the top-k rows of the whole shard at once through group maxima (the k best groups
of 16 rows per column hold every top-k row, so only ``16 k`` candidates per column are ranked
exactly), and works through the rest in blocks of about :data:`BLOCK_BYTES` (they stay in cache;
no shard-sized temporaries), merging the block partials with Chan's update.  Only the mean and
second moment are summed in float64; min, max, counts, top-k and the histogram are computed on
the stored float32 values, which float64 represents exactly, so the answers are those of float64
arithmetic (``|a| <= eps`` compares against the largest float32 <= eps).  The histogram's edges
are bfloat16 values (the nearest to ``10^(i/4)``) and a value's bin is decided by its top 16 bits
through a table: non-negative values fall in ``[e_i, e_i+1)``, negative ones in the mirror image
``(-e_i+1, -e_i]`` (so ``-e_i`` itself counts with the larger magnitudes; ``-0.0`` and negatives
closer to 0 than ``2**-133`` count as 0), NaN in the last bin.  numpy and torch do the elementwise
work on one thread: a process uses one core, and Ray workers add cores.
``map`` reads the step of each row from ``entry["row_steps"]`` (a per-layer int tensor the engine
adds from the shard's metadata) and falls back to ``entry["step"]``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from pydantic import Field

from mechray.analysis.base import JSON_NUMBER, Analysis, Context, Cost, Params, Workload, register
from mechray.analysis.moments import Moments
from mechray.analysis.render import grid, mean_of

# Fixed histogram edges: 0, then +-10^-4 .. +-10^4 with 4 bins per decade (each the nearest
# bfloat16, so that a float32's top 16 bits decide its bin); outliers go to the ends.
_MAG = torch.tensor(10.0 ** np.linspace(-4, 4, 33)).to(torch.bfloat16).double().numpy()
EDGES = np.concatenate([-_MAG[::-1], [0.0], _MAG])
GROUP = 16  # rows per group in the top-k filter


BLOCK_BYTES = 2 << 20  # float32 bytes of rows per block in map()


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
    def reads_store(cls, p: NeuronParams) -> bool:
        return False                     # finalize needs only the merged partial

    @classmethod
    def answer_bytes(cls, p: NeuronParams, w: Workload) -> float:
        return JSON_NUMBER * w.d * (8 + 4 * p.top_k) + 4096  # 6 stats, 4 top-k lists

    @classmethod
    def cost(cls, p: NeuronParams, w: Workload) -> Cost:
        return Cost(float(w.rows) * w.d * 12,
                    float(w.shard_rows) * w.d * 8 * 3 + p.top_k * w.d * 40)

    def map(self, rows: torch.Tensor, entry: dict[str, Any], layer: str) -> "NeuronPartial":
        """Statistics of one shard's rows: top-k over the whole shard through group maxima, the
        rest in blocks of about :data:`BLOCK_BYTES` (shard-sized temporaries cost a page fault
        per 4 KiB, which dominated the time), the blocks' moments merged with Chan's update."""
        with _one_thread():
            return self._map(_as_numpy(rows.reshape(len(rows), -1)), entry)

    def _map(self, x: np.ndarray, entry: dict[str, Any]) -> "NeuronPartial":
        total, d = x.shape
        if total == 0:
            return _empty(d)
        k = min(self.params.top_k, total)
        eps = _eps_for(x.dtype, self.params.eps)
        step = max(64, BLOCK_BYTES // (4 * max(d, 1))) // GROUP * GROUP
        moments = Moments.empty(d)
        small = np.zeros(d, np.int64)
        pos = np.zeros(d, np.int64)
        lo, hi = x[0].copy(), x[0].copy()
        rows_per = min(step, total)
        keys = _HistKeys(rows_per * d)
        # block-sized buffers reused for every block: fresh ones page-fault in a new process
        buf64, buf32, mask = (np.empty((rows_per, d), t) for t in (np.float64, x.dtype, bool))
        gmax = []          # maxima of 16-row groups, for the top-k: while the block is in cache
        for i in range(0, total, step):
            b = x[i:i + step]
            n = len(b)
            b64 = buf64[:n]
            np.copyto(b64, b)                       # sums in float64 (block-sized: in cache)
            mean = b64.mean(0)
            b64 -= mean
            moments = moments.merge(Moments(n, mean, np.einsum("ij,ij->j", b64, b64)))
            small += _count(np.less_equal(np.abs(b, out=buf32[:n]), eps, out=mask[:n]))
            pos += _count(np.greater(b, 0, out=mask[:n]))
            np.minimum(lo, b.min(0), out=lo)        # NaN propagates, as numpy's x.min(0)
            np.maximum(hi, b.max(0), out=hi)
            keys.add(b)
            if n >= GROUP:
                gmax.append(torch.amax(torch.from_numpy(b[:n - n % GROUP]).reshape(
                    -1, GROUP, d), dim=1))
        hist = keys.histogram()
        vals, rows_idx = _topk_rows(torch.from_numpy(x), k,
                                    torch.cat(gmax) if gmax and d else None)
        steps = entry.get("row_steps")
        steps = (np.asarray(steps, dtype=np.int64)[rows_idx] if steps is not None and
                 len(steps) == total else np.full(rows_idx.shape, int(entry.get("step", -1))))
        return NeuronPartial(
            n=total, moments=moments, min=lo.astype(np.float64),
            max=hi.astype(np.float64), small=small, pos=pos, hist=hist,
            top=TopRows(files=[entry["file"]], val=vals, file=np.zeros_like(rows_idx),
                        row=rows_idx, step=steps))

    def merge(self, a: "NeuronPartial", b: "NeuronPartial") -> "NeuronPartial":
        if a.n == 0 or b.n == 0:
            return b if a.n == 0 else a
        return NeuronPartial(
            n=a.n + b.n, moments=a.moments.merge(b.moments),
            min=np.minimum(a.min, b.min), max=np.maximum(a.max, b.max),
            small=a.small + b.small, pos=a.pos + b.pos, hist=a.hist + b.hist,
            top=a.top.merge(b.top, self.params.top_k))

    def finalize(self, partial: "NeuronPartial", ctx: Context, layer: str) -> dict[str, Any]:
        n = partial.n
        if n == 0:
            from mechray.analysis.base import Skip

            raise Skip(f"layer {layer!r} has no stored rows")
        sparsity = partial.small / n
        dead = np.flatnonzero(partial.small == n)
        top = partial.top
        files = np.asarray(top.files, dtype=object)
        tr = lambda arr: arr.T.tolist()  # noqa: E731  ([d][k]: neuron-major)
        return {
            "num_samples": int(n), "num_neurons": int(len(partial.moments.mean)),
            "eps": self.params.eps,
            "mean": partial.moments.mean.tolist(),
            "std": np.sqrt(partial.moments.variance()).tolist(),
            "min": partial.min.tolist(), "max": partial.max.tolist(),
            "sparsity": sparsity.tolist(), "fraction_positive": (partial.pos / n).tolist(),
            "dead_count": int(len(dead)), "dead_neurons": dead.tolist(),
            "histogram": {"edges": EDGES.tolist(), "counts": partial.hist.tolist()},
            "top_k": {"k": int(top.val.shape[0]), "values": tr(top.val),
                      "shard": tr(files[top.file]), "row": tr(top.row), "step": tr(top.step)},
        }


@dataclass(frozen=True)
class TopRows:
    """Per neuron, the k rows where it fires hardest: ``val``, ``file`` (index into ``files``),
    ``row`` and ``step``, each ``[k, d]``, ordered by (value desc, file, row)."""

    files: list[str]
    val: np.ndarray
    file: np.ndarray
    row: np.ndarray
    step: np.ndarray

    def merge(self, other: "TopRows", k: int) -> "TopRows":
        files = sorted(set(self.files) | set(other.files))
        where = {f: i for i, f in enumerate(files)}
        remap = [np.asarray([where[f] for f in t.files], dtype=np.int64) for t in (self, other)]
        val = np.concatenate([self.val, other.val])
        fil = np.concatenate([remap[0][self.file], remap[1][other.file]])
        row = np.concatenate([self.row, other.row])
        stp = np.concatenate([self.step, other.step])
        order = np.lexsort((row, fil, -val), axis=0)[:k]
        pick = lambda arr: np.take_along_axis(arr, order, axis=0)  # noqa: E731
        return TopRows(files, pick(val), pick(fil), pick(row), pick(stp))


@dataclass(frozen=True)
class NeuronPartial:
    """What ``map`` gives for some rows and ``merge`` combines exactly."""

    n: int
    moments: Moments
    min: np.ndarray
    max: np.ndarray
    small: np.ndarray        # rows with |a| <= eps, per neuron
    pos: np.ndarray          # rows with a > 0, per neuron
    hist: np.ndarray         # counts over EDGES
    top: TopRows


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread in the calling thread only (OpenMP's thread count is per thread):
    these small ops run 10-60x slower on two threads when another process holds a core, as
    each parallel region waits for a descheduled thread."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """float32 / float64 rows as they are (no copy); other dtypes widened exactly."""
    if x.dtype in (torch.float32, torch.float64):
        return x.numpy()
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.to(torch.float32).numpy()
    return x.to(torch.float64).numpy()


def _eps_for(dtype: np.dtype, eps: float) -> "float | np.floating":
    """A threshold in ``dtype`` with ``|a| <= it`` exactly when ``|a| <= eps`` in float64."""
    if dtype != np.float32:
        return eps
    e = np.float32(eps)
    return e if float(e) <= eps else np.nextafter(e, np.float32(-np.inf))


def _count(mask: np.ndarray) -> np.ndarray:
    """Per column, how many rows of a boolean [n, d] mask are set (int64)."""
    return np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.int32).astype(np.int64)


_INNER = EDGES[1:-1]


@functools.lru_cache(maxsize=1)
def _hist_table() -> np.ndarray:
    """The histogram bin of every top-16-bit key of a float32 (see the module docstring)."""
    nb = len(EDGES) - 1
    keys = np.arange(65536, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        mag = ((keys & 0x7FFF) << 16).view(np.float32).astype(np.float64)   # truncated |value|
        b = np.searchsorted(_INNER, mag, side="right")
    negative = (keys >> 15 == 1) & (keys & 0x7FFF != 0)
    b = np.where(negative, nb - 1 - b, b)
    return np.where(np.isnan(mag), nb - 1, b)


class _HistKeys:
    """Counts of float32 values per top-16-bit key, block by block (one shift into a reused
    buffer and ``torch.bincount``: 4x less time than ``np.bincount``, which widens to intp);
    :meth:`histogram` folds the key counts into the bins of :data:`EDGES`."""

    def __init__(self, size: int):
        self.buf = np.empty(size, np.uint32)
        self.per_key = torch.zeros(65536, dtype=torch.int64)

    def add(self, b: np.ndarray) -> None:
        if b.dtype != np.float32:                   # binned as float32, like float32 rows
            b = b.astype(np.float32)
        flat = np.ascontiguousarray(b).reshape(-1)
        key = np.right_shift(flat.view(np.uint32), 16, out=self.buf[:flat.size])
        self.per_key += torch.bincount(torch.from_numpy(key.view(np.int32)), minlength=65536)

    def histogram(self) -> np.ndarray:
        return np.bincount(_hist_table(), weights=self.per_key.numpy(),
                           minlength=len(EDGES) - 1).astype(np.int64)


def _histogram(x: np.ndarray) -> np.ndarray:
    """Counts of ``x``'s values over :data:`EDGES` (bins as in the module docstring)."""
    keys = _HistKeys(x.size)
    keys.add(x)
    return keys.histogram()


def _topk_rows(x: torch.Tensor, k: int, gmax: Optional[torch.Tensor] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k largest values and their rows; ties go to the lowest row (deterministic).

    Returns ``(values[k, d], rows[k, d])`` (float64, int64) ordered by (value desc, row asc).
    The maxima of groups of :data:`GROUP` rows (``gmax``, computed here unless given) are
    ranked first: the k best groups of a column hold every row at or above its k-th value, so
    only their rows (and the rows after the last whole group) are ranked exactly.  Columns where
    more than k groups reach the k-th group maximum (ties, e.g. a dead neuron) are ranked over
    all their rows.
    """
    n, d = x.shape
    if n < 4 * GROUP * k or d == 0:
        return _topk_exact(x, k)
    full = n - n % GROUP
    if gmax is None:
        gmax = torch.amax(x[:full].reshape(-1, GROUP, d), dim=1)            # [groups, d]
    if torch.isnan(gmax).any() or (full < n and torch.isnan(x[full:]).any()):
        # NaN never ranks as "max-activating"; +-inf stay what they are
        x = torch.nan_to_num(x, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        gmax = torch.amax(x[:full].reshape(-1, GROUP, d), dim=1)
    top_g, groups = torch.topk(gmax.T.contiguous(), k, dim=1)             # [d, k]
    tied = _count(gmax.numpy() >= top_g[:, -1].numpy()) > k
    groups = groups.sort(dim=1).values                                     # rows ascending
    cand = (groups.unsqueeze(2) * GROUP + torch.arange(GROUP)).reshape(d, -1)
    if full < n:
        cand = torch.cat([cand, torch.arange(full, n).expand(d, -1)], dim=1)
    cand = cand.T.contiguous()                                             # [candidates, d]
    vals, at = _topk_exact(x.gather(0, cand), k)
    rows = np.take_along_axis(cand.numpy(), at, 0)
    if tied.any():
        cols = np.flatnonzero(tied)
        vals[:, cols], rows[:, cols] = _topk_exact(x[:, torch.from_numpy(cols)], k)
    return vals, rows


def _topk_exact(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_topk_rows` over every row: ``torch.topk`` along each column (contiguous after a
    transpose) picks the set; only columns where rows tied with the k-th value were left out
    are redone exactly."""
    xn = x.numpy()
    if xn.dtype.kind == "f" and np.isnan(xn).any():
        # NaN never ranks as "max-activating"; +-inf stay what they are
        x = torch.nan_to_num(x, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
        xn = x.numpy()
    vals_t, rows_t = torch.topk(x.T.contiguous(), k, dim=1)
    vals, rows = vals_t.T, rows_t.T.contiguous()
    kth = vals[-1]
    # every value above the k-th is in the set, so more than k values >= it means a tie at the
    # k-th value was cut
    left_out = torch.from_numpy(_count(xn >= kth.numpy()) > k)
    if left_out.any():
        cols = left_out.nonzero().flatten()
        sub = x[:, cols]
        above, tied = sub > kth[cols], sub == kth[cols]
        need = k - above.sum(0)
        chosen = above | (tied & (tied.cumsum(0) <= need))   # exactly k rows per column
        _, row = chosen.T.nonzero(as_tuple=True)              # column-major: rows ascending
        rows[:, cols] = row.reshape(len(cols), k).T
    rows_np = rows.numpy()
    vals_np = x.gather(0, rows).double().numpy()
    order = np.lexsort((rows_np, -vals_np), axis=0)
    return np.take_along_axis(vals_np, order, 0), np.take_along_axis(rows_np, order, 0)


def _empty(d: int) -> NeuronPartial:
    z = np.zeros(d)
    none = np.zeros((0, d), np.int64)
    return NeuronPartial(0, Moments.empty(d), z, z, z.astype(np.int64), z.astype(np.int64),
                         np.zeros(len(EDGES) - 1, dtype=np.int64),
                         TopRows([], np.zeros((0, d)), none, none, none))
