"""Count, mean and centred second moment of rows, merged exactly: the statistic under neuron
stats (per column), PCA and training dynamics (full co-moment).

Usage::

    from mechray.analysis.moments import Moments

    a = Moments.of(rows_a)                    # per-column: m2[j] = sum (x[:, j] - mean[j])^2
    b = Moments.of(rows_b)
    m = a.merge(b)                            # exactly Moments.of(concat(rows_a, rows_b))
    m.variance()                              # population variance per column
    c = Moments.of(rows, full=True).covariance()   # [d, d], ddof=1

The merge is Chan, Golub and LeVeque's pairwise update in float64: order-independent up to
rounding, so a merge tree over Ray tasks gives what one pass over all rows gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    def empty(cls, d: int, full: bool = False) -> "Moments":
        return cls(0, np.zeros(d), np.zeros((d, d) if full else d))

    def merge(self, other: "Moments") -> "Moments":
        if self.n == 0 or other.n == 0:
            return other if self.n == 0 else self
        n = self.n + other.n
        delta = other.mean - self.mean
        spread = np.outer(delta, delta) if self.m2.ndim == 2 else delta * delta
        return Moments(n, self.mean + delta * (other.n / n),
                       self.m2 + other.m2 + spread * (self.n * other.n / n))

    def variance(self, ddof: int = 0) -> np.ndarray:
        """Per column (the diagonal of a full co-moment)."""
        m2 = np.diag(self.m2) if self.m2.ndim == 2 else self.m2
        return m2 / max(self.n - ddof, 1)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        if self.m2.ndim != 2:
            raise ValueError("covariance needs Moments.of(rows, full=True)")
        return self.m2 / max(self.n - ddof, 1)
