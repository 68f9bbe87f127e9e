"""One exact merge of moments (Chan) under neuron stats, PCA and dynamics."""

import numpy as np
import pytest
import torch

from mechray.analysis.moments import Moments


@pytest.mark.parametrize("full", [False, True])
def test_any_merge_order_equals_one_pass(full):
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(1000, 6)) * rng.uniform(0.1, 10, size=6)
    cuts = [0, 1, 7, 300, 301, 999, 1000]           # includes 1-row and empty chunks
    parts = [Moments.of(torch.from_numpy(x[a:b]), full=full) for a, b in zip(cuts, cuts[1:])]
    parts.append(Moments.empty(6, full))
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    for m in (left, right):
        assert m.n == 1000
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(m.variance(), x.var(0), rtol=1e-12)
    if full:
        np.testing.assert_allclose(left.covariance(), np.cov(x, rowvar=False), rtol=1e-12)
    else:
        with pytest.raises(ValueError, match="full=True"):
            left.covariance()


def test_float32_rows_are_summed_in_float64():
    x = torch.full((10_000, 1), 1e4, dtype=torch.float32) + torch.arange(10_000.0)[:, None] % 2
    m = Moments.of(x)
    assert m.mean.dtype == np.float64 and m.mean[0] == pytest.approx(10000.5, abs=1e-9)
    assert m.variance()[0] == pytest.approx(0.25, abs=1e-9)
