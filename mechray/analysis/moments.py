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
BLAS ``syrk`` per block of up to :data:`BLOCK_BYTES` (``a.T @ a`` in numpy), each block's product
added into a float64 matrix, and the mean corrected in float64.  Where a sample of the rows shows
a column whose mean exceeds its spread, the rows are first centred on the sample's mean (a copy
per block): float32 products of uncentred rows would lose the variance to cancellation.  It
agrees with the float64 co-moment to float32 precision (relative ~1e-7 per entry), the precision
the rows were stored in.  Float64 rows take the float64 path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

BLOCK_BYTES = 64 << 20  # float32 bytes of rows per syrk block in comoment(): large blocks keep
                        # BLAS efficient (4 MiB blocks cost 25% more); the buffer is bounded


def _column_sums(x: np.ndarray) -> np.ndarray:
    """Column sums of float32 rows in float64, summed in float32 over groups of 64 rows only
    (numpy adds rows one after another along axis 0; a float64 copy of the rows costs 10x)."""
    n = len(x) - len(x) % 64
    head = x[:n].reshape(-1, 64, x.shape[1]).sum(1).sum(0, dtype=np.float64) if n else 0.0
    return head + x[n:].sum(0, dtype=np.float64)


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
        step = max(16, BLOCK_BYTES // (4 * max(d, 1)))
        sample = x[::max(1, n // 256)][:256].astype(np.float64)
        shift = sample.mean(0)
        if np.all(shift * shift <= sample.var(0)):
            # |mean| <= std in every column (on a sample of rows): the product of the rows as
            # they are loses no more than a shift would gain, and needs no copy of them
            grams: Optional[np.ndarray] = None
            total = np.zeros(d)
            for i in range(0, n, step):
                block = x[i:i + step]
                g = block.T @ block               # numpy spots a.T @ a: float32 syrk
                if grams is None:
                    grams = g.astype(np.float64)
                else:
                    grams += g
                total += _column_sums(block)
            assert grams is not None
            delta = total / n
            grams -= np.outer(delta, delta * n)   # in place: no d x d temporaries per shard
            return cls(int(n), delta, grams)
        # Otherwise centre on the sample mean: a column of ones beside the shifted rows makes one
        # syrk give the co-moment block and, in its last column, the column sums.
        shift32 = shift.astype(np.float32)
        grams = np.zeros((d + 1, d + 1))
        buf = np.empty((min(step, n), d + 1), np.float32)
        buf[:, d] = 1.0
        for i in range(0, n, step):
            block = x[i:i + step]
            b = buf[:len(block)]
            np.subtract(block, shift32, out=b[:, :d])
            grams += b.T @ b
        com, total = np.ascontiguousarray(grams[:d, :d]), grams[:d, d].copy()
        delta = total / n                         # mean about the shift, float64
        com -= n * np.outer(delta, delta)         # co-moment about the shift -> about the mean
        return cls(int(n), shift32.astype(np.float64) + delta, com)

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
