"""Count, mean and centred second moment of rows, merged exactly: the statistic under neuron
stats (per column), PCA and training dynamics (full co-moment).

Usage::

    from mechray.analysis.moments import Moments

    a = Moments.of(rows_a)                    # per-column: m2[j] = sum (x[:, j] - mean[j])^2
    b = Moments.of(rows_b)
    m = a.merge(b)                            # exactly Moments.of(concat(rows_a, rows_b))
    m.variance()                              # population variance per column
    c = Moments.of(rows, full=True).covariance()   # [d, d], ddof=1
    c = Moments.comoment(rows32).covariance()      # float32 rows: BLAS syrk in float32 (fast)

The merge is Chan, Golub and LeVeque's pairwise update in float64: order-independent up to
rounding, so a merge tree over Ray tasks gives what one pass over all rows gives.

:meth:`Moments.comoment` is the fast co-moment for PCA: float32 rows are multiplied with one
BLAS ``syrk`` per block of up to :data:`BLOCK_BYTES` (``a.T @ a`` in numpy; the blocks depend
on the shape only, and go to as many threads of single-threaded BLAS as BLAS had threads), each
block's product added into a float64 matrix, and the mean corrected in float64.  Where a sample
of the rows shows a column whose mean exceeds its spread, the rows are first centred on the
sample's mean (a copy per block): float32 products of uncentred rows would lose the variance to
cancellation.  It agrees with the float64 co-moment to float32 precision (relative ~1e-7 per
entry), the precision the rows were stored in.  Float64 rows take the float64 path.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

BLOCK_BYTES = 16 << 20  # float32 bytes of rows per syrk block in comoment() (at most): smaller
                        # blocks cost BLAS efficiency (2,500 x 512 rows: 12% more than 5,000)


def _column_sums(x: np.ndarray) -> np.ndarray:
    """Column sums of float32 rows in float64, summed in float32 over groups of 64 rows only
    (numpy adds rows one after another along axis 0; a float64 copy of the rows costs 10x)."""
    n = len(x) - len(x) % 64
    head = x[:n].reshape(-1, 64, x.shape[1]).sum(1).sum(0, dtype=np.float64) if n else 0.0
    return head + x[n:].sum(0, dtype=np.float64)


def _row_blocks(n: int, d: int) -> list[tuple[int, int]]:
    """Equal row blocks of at most :data:`BLOCK_BYTES` float32 bytes: a function of the shape
    only, so the float64 sum of the blocks' products is the same on any number of threads."""
    most = max(16, BLOCK_BYTES // (4 * max(d, 1)))
    size = -(-n // -(-n // most))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _block_grams(x: np.ndarray, blocks: list[tuple[int, int]], shift32: Optional[np.ndarray]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each block's float32 ``syrk`` (and its column sums): of the rows as they are, or of the
    rows minus ``shift32`` beside a column of ones (one reused buffer)."""
    d = x.shape[1]
    out = []
    buf: Optional[np.ndarray] = None
    for lo, hi in blocks:
        block = x[lo:hi]
        if shift32 is None:
            out.append((block.T @ block, _column_sums(block)))   # numpy spots a.T @ a: syrk
            continue
        if buf is None:
            buf = np.empty((max(h - lo_ for lo_, h in blocks), d + 1), np.float32)
            buf[:, d] = 1.0
        b = buf[:hi - lo]
        np.subtract(block, shift32, out=b[:, :d])
        g = b.T @ b
        out.append((g[:d, :d], g[:d, d].astype(np.float64)))
    return out


def _grams(x: np.ndarray, shift32: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sum of every block's float32 product and column sums.  Where BLAS would run
    one call on several threads, the blocks go instead to that many Python threads, each calling
    single-threaded BLAS: OpenBLAS' threaded syrk of a 10k x 512 block runs 1.5x faster on two
    cores than on one, two independent single-threaded ones 1.9x (so a Ray worker, on one BLAS
    thread, is unchanged).  The BLAS thread limit is process-wide while it lasts, so one call at
    a time takes this path; a concurrent call computes its blocks in its own thread."""
    blocks = _row_blocks(*x.shape)
    threads = min(len(blocks), _blas_threads())
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if threads > 1 and _PARALLEL.acquire(blocking=False):
        try:
            pool = _pool(threads)
            with _blas_controller().limit(limits=1):
                done = list(pool.map(lambda j: _block_grams(x, blocks[j::threads], shift32),
                                     range(threads)))
            parts = [done[i % threads][i // threads] for i in range(len(blocks))]  # block order
        finally:
            _PARALLEL.release()
    else:
        parts = _block_grams(x, blocks, shift32)
    grams = parts[0][0].astype(np.float64)
    total = parts[0][1].copy()
    for g, t in parts[1:]:
        grams += g
        total += t
    return grams, total


_PARALLEL = threading.Lock()   # held by the one call at a time that lowers BLAS' threads


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process' pool (a forked child gets its own: the parent's threads do not exist in it,
    and an executor that believes they do never runs what it is given)."""
    return _pool_of(threads, os.getpid())


@functools.lru_cache(maxsize=None)
def _pool_of(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="mechray-syrk")


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """How many threads numpy's BLAS would use now (1 without threadpoolctl)."""
    try:
        return max([int(c.num_threads) for c in _blas_controller().lib_controllers] or [1])
    except ImportError:
        return 1


@dataclass(frozen=True)
class Moments:
    n: int
    mean: np.ndarray       # [d], float64
    m2: np.ndarray         # [d] (per column) or [d, d] (co-moment), float64

    @classmethod
    def of(cls, rows: torch.Tensor | np.ndarray, full: bool = False) -> "Moments":
        """The moments of ``rows`` [n, d], computed in float64."""
        x = torch.as_tensor(rows).to(torch.float64)
        d = x.shape[1]
        if x.shape[0] == 0:
            return cls.empty(d, full)
        mean = x.mean(0)
        xc = x - mean
        m2 = xc.T @ xc if full else (xc * xc).sum(0)
        return cls(int(x.shape[0]), mean.numpy(), m2.numpy())

    @classmethod
    def comoment(cls, rows: torch.Tensor | np.ndarray) -> "Moments":
        """Full co-moment of ``rows`` [n, d] in the rows' precision (float32 syrk per block,
        accumulated and merged in float64); float64 rows are computed in float64."""
        x = rows.numpy() if isinstance(rows, torch.Tensor) and rows.dtype in (
            torch.float32, torch.float64) else rows
        if isinstance(x, torch.Tensor):          # float16 / bfloat16 / integers: widen once
            x = x.to(torch.float32).numpy()
        x = np.asarray(x)
        if x.dtype != np.float32:
            return cls.of(x, full=True)
        n, d = x.shape
        if n == 0:
            return cls.empty(d, True)
        sample = x[::max(1, n // 256)][:256].astype(np.float64)
        shift = sample.mean(0)
        # |mean| <= std in every column (on a sample of rows): the product of the rows as they
        # are loses no more than a shift would gain, and needs no copy of them.  Otherwise centre
        # on the sample mean; a column of ones beside the shifted rows makes one syrk give the
        # co-moment block and, in its last column, the column sums.
        shift32 = None if np.all(shift * shift <= sample.var(0)) else shift.astype(np.float32)
        grams, total = _grams(x, shift32)
        delta = total / n                                    # the mean about the shift
        grams -= np.outer(delta, delta * n)                  # about the shift -> about the mean
        mean = delta if shift32 is None else shift32.astype(np.float64) + delta
        return cls(int(n), mean, grams)

    @classmethod
    def empty(cls, d: int, full: bool = False) -> "Moments":
        return cls(0, np.zeros(d), np.zeros((d, d) if full else d))

    def merge(self, other: "Moments") -> "Moments":
        if self.n == 0 or other.n == 0:
            return other if self.n == 0 else self
        n = self.n + other.n
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2
        scaled = delta * (self.n * other.n / n)
        m2 += np.outer(delta, scaled) if m2.ndim == 2 else delta * scaled   # one d x d temporary
        return Moments(n, self.mean + delta * (other.n / n), m2)

    def variance(self, ddof: int = 0) -> np.ndarray:
        """Per column (the diagonal of a full co-moment)."""
        m2 = np.diag(self.m2) if self.m2.ndim == 2 else self.m2
        return m2 / max(self.n - ddof, 1)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        if self.m2.ndim != 2:
            raise ValueError("covariance needs Moments.of(rows, full=True)")
        return self.m2 / max(self.n - ddof, 1)
