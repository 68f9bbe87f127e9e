"""The fast paths of the stat analyses: float32 co-moments (syrk per block, merged in float64),
neuron stats in blocks on the stored float32 values, and map tasks over groups of shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechray.analysis import get_analysis, neuron
from mechray.analysis.tasks import MIN_TASKS, TASK_BYTES, shard_groups
from mechray.analysis.moments import Moments


def test_float32_comoment_agrees_with_float64_to_float32_precision():
    rng = np.random.default_rng(0)
    d = 24
    mix = rng.normal(size=(d, d))
    x = (rng.normal(size=(20_000, d)) * np.linspace(4, 0.05, d)) @ mix + 1e3  # large means
    x32 = x.astype(np.float32)
    ref = Moments.of(x32.astype(np.float64), full=True)
    got = Moments.comoment(torch.from_numpy(x32))
    assert got.n == ref.n and got.m2.dtype == np.float64
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9)
    scale = np.sqrt(np.outer(np.diag(ref.m2), np.diag(ref.m2)))
    assert np.max(np.abs(got.m2 - ref.m2) / scale) < 2e-6
    # merged across "shards" in float64: the same statistic
    parts = [Moments.comoment(x32[a:b]) for a, b in ((0, 1), (1, 7000), (7000, 20_000))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert np.max(np.abs(merged.m2 - ref.m2) / scale) < 2e-6
    # float64 rows keep the float64 path
    np.testing.assert_allclose(Moments.comoment(x).m2, Moments.of(x, full=True).m2, rtol=1e-12)


def _reference(x: np.ndarray, eps: float, k: int):
    """neuron's statistics the slow, obvious way in float64."""
    x64 = x.astype(np.float64)
    safe = np.where(np.isnan(x64), -np.inf, x64)
    order = np.lexsort((np.broadcast_to(np.arange(len(x))[:, None], x.shape), -safe), axis=0)[:k]
    return {"mean": x64.mean(0), "var": x64.var(0), "min": x64.min(0), "max": x64.max(0),
            "small": (np.abs(x64) <= eps).sum(0), "pos": (x64 > 0).sum(0),
            "hist": np.bincount(np.searchsorted(neuron.EDGES[1:-1], x64.reshape(-1), side="right"),
                                minlength=len(neuron.EDGES) - 1),
            "top_rows": order, "top_vals": np.take_along_axis(safe, order, 0)}


def test_neuron_blocks_equal_float64_reference_on_edge_values(monkeypatch):
    monkeypatch.setattr(neuron, "BLOCK_BYTES", 64 * 4 * 6)   # 64-row blocks: many merges
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 6, generator=g)
    x[:, 0] = 0.0                                            # dead neuron
    x[::7, 1] = 2.5                                          # ties at the top, across blocks
    x[10, 2], x[11, 2], x[12, 2] = 1e-6, -1e-6, float(np.nextafter(np.float32(1e-6), np.float32(1)))
    for i, e in enumerate(neuron.EDGES[1:-1][::4]):         # values on and beside bin edges
        x[100 + i, 3] = float(np.float32(e))
        x[200 + i, 3] = float(np.nextafter(np.float32(e), np.float32(0)))
    x[5, 4] = float("inf")
    x[6, 4] = float("nan")
    x[7, 5] = -float("inf")
    a = get_analysis("neuron", {"eps": 1e-6, "top_k": 4})
    p = a.map(x, {"file": "f", "step": 3}, "l")
    ref = _reference(x.numpy(), 1e-6, 4)
    finite = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(p.moments.mean[finite[:-1]], ref["mean"][finite[:-1]], rtol=1e-12)
    np.testing.assert_allclose(p.moments.variance()[:4], ref["var"][:4], rtol=1e-10)
    np.testing.assert_array_equal(p.min[[0, 1, 2, 3, 5]], ref["min"][[0, 1, 2, 3, 5]])
    assert np.isnan(p.min[4]) and np.isnan(p.max[4])       # NaN propagates, as numpy's
    np.testing.assert_array_equal(p.small, ref["small"])
    np.testing.assert_array_equal(p.pos, ref["pos"])
    np.testing.assert_array_equal(p.hist, ref["hist"])
    np.testing.assert_array_equal(p.top.row, ref["top_rows"])
    np.testing.assert_array_equal(p.top.val, ref["top_vals"])
    assert p.top.val[0, 4] == np.inf and p.small[0] == 1000 and (p.top.step == 3).all()
    # bfloat16 rows: the same statistics as their exact float32 widening
    b = x.to(torch.bfloat16)
    pb, pw = a.map(b, {"file": "f"}, "l"), a.map(b.float(), {"file": "f"}, "l")
    np.testing.assert_array_equal(pb.hist, pw.hist)
    np.testing.assert_array_equal(pb.top.row, pw.top.row)


@pytest.mark.parametrize("n, per_task", [(0, None), (1, None), (5, None), (100, None),
                                         (1000, None), (7, 3)])
def test_shard_groups_cover_every_shard_in_order(n, per_task):
    entries = [{"file": f"s{i}", "bytes": 20 << 20} for i in range(n)]
    groups = shard_groups(entries, per_task)
    assert [e for g in groups for e in g] == entries
    if per_task:
        assert [len(g) for g in groups] == [3, 3, 1]
    elif n:
        assert len(groups) >= min(n, MIN_TASKS)
        assert max(len(g) for g in groups) * (20 << 20) <= max(TASK_BYTES, 20 << 20)
