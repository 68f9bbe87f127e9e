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
on the shape only, and go to as many threads of single-threaded BLAS as BLAS had threads, so
the bits do not depend on the process, the thread count or the BLAS kernel), each
block's product added into a float64 matrix, and the mean corrected in float64.  Where a sample
of the rows shows a column whose mean exceeds its spread, the rows are first centred on the
sample's mean (a copy per block): float32 products of uncentred rows would lose the variance to
cancellation.  It agrees with the float64 co-moment to float32 precision (relative ~1e-7 per
entry), the precision the rows were stored in.  Float64 rows take the float64 path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

BLOCK_BYTES = 16 << 20  # float32 bytes of rows per syrk block in comoment() (at most): smaller
                        # blocks cost BLAS efficiency
SPLIT_BYTES = 4 << 20   # rows of at least twice this many bytes are cut into two blocks or more


def _column_sums(x: np.ndarray) -> np.ndarray:
    """Column sums of float32 rows in float64, summed in float32 over groups of 64 rows only
    (numpy adds rows one after another along axis 0; a float64 copy of the rows costs 10x)."""
    n = len(x) - len(x) % 64
    head = x[:n].reshape(-1, 64, x.shape[1]).sum(1).sum(0, dtype=np.float64) if n else 0.0
    return head + x[n:].sum(0, dtype=np.float64)


def _row_blocks(n: int, d: int) -> list[tuple[int, int]]:
    """Equal row blocks of at most :data:`BLOCK_BYTES` float32 bytes, and at least two once the
    rows fill two of :data:`SPLIT_BYTES` (so two threads have work on a mid-sized shard): a
    function of the shape only, so the float64 sum of the blocks' products is the same on any
    number of threads and in any process."""
    size_bytes = 4 * n * max(d, 1)
    count = max(-(-size_bytes // BLOCK_BYTES), 2 if size_bytes >= 2 * SPLIT_BYTES else 1, 1)
    count = min(count, max(1, n // 16))
    size = -(-n // count) if n else 1
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
    """The float64 sum of every block's float32 product and column sums, each product on
    single-threaded BLAS.  OpenBLAS' threaded ``syrk`` does not give the bits of its one-thread
    ``syrk`` with every kernel (with ``OPENBLAS_CORETYPE=Haswell`` they differ by ~1e-7 per
    entry), and a Ray worker runs one BLAS thread while a driver runs several: so the products
    always run on one BLAS thread, and where BLAS had several, the blocks go to that many Python
    threads instead (single-threaded syrk on separate blocks also runs faster than one threaded
    call).  The BLAS limit is process-wide, so co-moments in one process take turns."""
    blocks = _row_blocks(*x.shape)
    with single_threaded_blas() as had:
        threads = min(len(blocks), had)
        if threads > 1:
            done = list(_pool(threads).map(
                lambda j: _block_grams(x, blocks[j::threads], shift32), range(threads)))
            parts = [done[i % threads][i // threads] for i in range(len(blocks))]  # block order
        else:
            parts = _block_grams(x, blocks, shift32)
    grams = parts[0][0].astype(np.float64)
    total = parts[0][1].copy()
    for g, t in parts[1:]:
        grams += g
        total += t
    return grams, total


_BLAS = threading.RLock()   # held while this process' BLAS is limited to one thread


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[int]:
    """Run the block on one BLAS thread (so its floating-point result does not depend on how
    many threads BLAS had, nor on the process: a Ray worker or a driver); yields how many
    threads BLAS had before, for callers that spread work over Python threads instead.
    Re-entrant; concurrent users in one process take turns.

    Usage::

        with single_threaded_blas() as threads:
            evals, evecs = scipy.linalg.eigh(cov)
    """
    with _BLAS:
        had = _blas_threads()
        if had <= 1:
            yield 1
            return
        with _blas_controller().limit(limits=1):
            yield had


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process' pool (a forked child gets its own: the parent's threads do not exist in it,
    and an executor that believes they do never runs what it is given)."""
    return _pool_of(threads, os.getpid())


@functools.lru_cache(maxsize=None)
def _pool_of(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="mechray-syrk")


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    """Every BLAS this process can run: numpy's and scipy's (a library of its own, loaded on
    import, so it is imported first: the eigensolver must be limited too)."""
    from threadpoolctl import ThreadpoolController

    try:
        import scipy.linalg  # noqa: F401
    except ImportError:      # scipy is optional (the analysis extra); numpy's BLAS alone then
        pass
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
        xc = (x - mean).numpy()
        if full:
            with single_threaded_blas():      # the same bits in a Ray worker and a driver
                m2 = xc.T @ xc
        else:
            m2 = (xc * xc).sum(0)
        return cls(int(x.shape[0]), mean.numpy(), m2)

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
