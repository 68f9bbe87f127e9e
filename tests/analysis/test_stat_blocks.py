"""The fast paths of the stat analyses: float32 co-moments (syrk per block, merged in float64),
neuron stats in blocks on the stored float32 values, and map tasks over groups of shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechray.analysis import get_analysis, neuron
from mechray.analysis.moments import Moments
from mechray.analysis.tasks import MIN_TASKS, TASK_BYTES, shard_groups


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
    # means within the spread (the rows are multiplied as they are, no centring copy), a row
    # count that is not a multiple of the 64-row sum groups, and a dead column
    y = (rng.normal(size=(12_345, d)) * np.linspace(3, 0.1, d) + np.linspace(-2, 2, d) * 0.05)
    y[:, 5] = 0.0
    y32 = y.astype(np.float32)
    ref = Moments.of(y32.astype(np.float64), full=True)
    got = Moments.comoment(torch.from_numpy(y32))
    scale = np.sqrt(np.outer(np.diag(ref.m2), np.diag(ref.m2))) + 1e-30
    np.testing.assert_allclose(got.mean, ref.mean, atol=1e-7 * np.abs(y32).max())
    assert np.max(np.abs(got.m2 - ref.m2) / scale) < 2e-6 and not got.m2[5].any()
    # float64 rows keep the float64 path
    np.testing.assert_allclose(Moments.comoment(x).m2, Moments.of(x, full=True).m2, rtol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["as-is", "centred"])
def test_comoment_blocks_give_the_same_bits_on_any_number_of_blas_threads(monkeypatch, offset):
    """The co-moment's row blocks depend on the shape only: spread over two threads of
    single-threaded BLAS, done in one thread, or done inside a caller's one-thread BLAS block,
    the float64 sum is bit for bit the same (and the float64 statistic to 2e-6)."""
    from threadpoolctl import threadpool_limits

    from mechray.analysis import moments

    monkeypatch.setattr(moments, "BLOCK_BYTES", 4 * 16 * 700)     # 700-row blocks: 8 of them
    rng = np.random.default_rng(3)
    x32 = (rng.normal(size=(5_001, 16)) * np.linspace(2, 0.1, 16) + offset).astype(np.float32)
    assert len(moments._row_blocks(*x32.shape)) == 8
    with threadpool_limits(2, user_api="blas"):
        assert moments._blas_threads() == 2
        two = Moments.comoment(x32)
        assert moments._blas_threads() == 2                     # the BLAS limit was lifted
        with moments.single_threaded_blas() as had:             # a caller already holds it
            assert had == 2 and moments._blas_threads() == 1
            held = Moments.comoment(x32)
    with threadpool_limits(1, user_api="blas"):
        one = Moments.comoment(x32)
    for other in (held, one):
        np.testing.assert_array_equal(other.m2, two.m2)
        np.testing.assert_array_equal(other.mean, two.mean)
    ref = Moments.of(x32.astype(np.float64), full=True)
    scale = np.sqrt(np.outer(np.diag(ref.m2), np.diag(ref.m2)))
    assert np.max(np.abs(two.m2 - ref.m2) / scale) < 2e-6
    np.testing.assert_allclose(two.mean, ref.mean, rtol=1e-6)


_KERNEL_CHECK = """
import numpy as np
from threadpoolctl import threadpool_limits
from mechray.analysis.feature import top_eigh
from mechray.analysis.moments import Moments
rng = np.random.default_rng(0)
out = []
for n, d in ((2_000, 64), (40_000, 64), (3_000, 200)):
    x = np.maximum(rng.standard_normal((n, d)), 0).astype(np.float32)
    with threadpool_limits(2, user_api="blas"):
        two = Moments.comoment(x)
        two_full = Moments.of(x, full=True)
        two_eig = top_eigh(two.covariance(), 8)
    with threadpool_limits(1, user_api="blas"):
        one = Moments.comoment(x)
        one_full = Moments.of(x, full=True)
        one_eig = top_eigh(one.covariance(), 8)
    out.append(bool(np.array_equal(two.m2, one.m2) and np.array_equal(two_full.m2, one_full.m2)
                    and all(np.array_equal(a, b) for a, b in zip(two_eig, one_eig))))
print(out)
"""


@pytest.mark.parametrize("coretype", ["Haswell", None], ids=["haswell-kernel", "native-kernel"])
def test_products_give_the_same_bits_on_one_or_two_blas_threads_whatever_the_kernel(coretype):
    """A Ray worker runs one BLAS thread, a driver several: with OpenBLAS' Haswell kernels a
    threaded ``syrk`` differs from the one-thread one (~1e-7 relative, so Ray and in-process
    PCA differed by 5.8e-9), so every product behind PCA runs on one BLAS thread. Checked in a
    fresh process per kernel choice (OpenBLAS reads ``OPENBLAS_CORETYPE`` at load)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[True, True, True]", out.stdout


def _comoment_sum(x32, queue) -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2, user_api="blas"):
        queue.put(float(Moments.comoment(x32).m2.sum()))


def test_comoment_in_a_forked_child_after_the_parent_used_its_threads(monkeypatch):
    """A process forked after a threaded co-moment gets threads of its own (the parent's pool
    does not exist in the child; reusing it hung the child forever)."""
    import multiprocessing

    from threadpoolctl import threadpool_limits

    from mechray.analysis import moments

    monkeypatch.setattr(moments, "BLOCK_BYTES", 4 * 16 * 700)
    x32 = np.random.default_rng(5).normal(size=(5_001, 16)).astype(np.float32)
    with threadpool_limits(2, user_api="blas"):
        want = float(Moments.comoment(x32).m2.sum())        # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_comoment_sum, args=(x32, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in Moments.comoment")
    assert child.exitcode == 0 and queue.get(timeout=5) == want


def _reference(x: np.ndarray, eps: float, k: int):
    """neuron's statistics the slow, obvious way in float64."""
    x64 = x.astype(np.float64)
    safe = np.where(np.isnan(x64), -np.inf, x64)
    order = np.lexsort((np.broadcast_to(np.arange(len(x))[:, None], x.shape), -safe), axis=0)[:k]
    return {"mean": x64.mean(0), "var": x64.var(0), "min": x64.min(0), "max": x64.max(0),
            "small": (np.abs(x64) <= eps).sum(0), "pos": (x64 > 0).sum(0),
            "hist": _reference_hist(x64.reshape(-1)),
            "top_rows": order, "top_vals": np.take_along_axis(safe, order, 0)}


def _reference_hist(v: np.ndarray) -> np.ndarray:
    """The documented bins: ``[e_i, e_i+1)`` for values >= 0, the mirror image ``(-e_i+1, -e_i]``
    for negative ones (those closer to 0 than 2**-133 count as 0), NaN last."""
    nb = len(neuron.EDGES) - 1
    b = np.searchsorted(neuron.EDGES[1:-1], np.abs(v), side="right")
    b = np.where((v < 0) & (np.abs(v) >= 2.0 ** -133), nb - 1 - b, b)
    return np.bincount(np.where(np.isnan(v), nb - 1, b), minlength=nb)


def test_histogram_edges_are_bfloat16_and_bins_mirror_around_zero():
    e = neuron.EDGES
    assert np.array_equal(e, -e[::-1]) and len(e) == 67
    assert np.array_equal(torch.tensor(e).to(torch.bfloat16).double().numpy(), e)
    np.testing.assert_allclose(e[34:], 10.0 ** np.linspace(-4, 4, 33), rtol=2 ** -8)
    v = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-4, -1e-4, e[40], -e[40], np.inf, -np.inf, np.nan,
                  2.0 ** -133, -(2.0 ** -133)], dtype=np.float32)
    want = {0: 33, 1: 33, 2: 33, 3: 33, 4: 33 + (1e-4 >= e[34]), 6: 33 + 7, 7: 32 - 7, 8: 65,
            9: 0, 10: 65, 11: 33, 12: 32}
    got = [int(np.flatnonzero(neuron._histogram(v[i:i + 1]))[0]) for i in range(len(v))]
    for i, b in want.items():
        assert got[i] == b, (i, v[i], got[i], b)
    np.testing.assert_array_equal(neuron._histogram(v), _reference_hist(v.astype(np.float64)))


def test_top_rows_through_group_maxima_equal_the_exact_ranking():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2003, 9, generator=g)                    # a tail after the last group
    x[:, 0] = 0.0                                            # dead: every group ties
    x[::5, 1] = 3.0                                          # ties at the top in many groups
    x[2001, 2] = 50.0                                        # the best row in the tail
    x[17, 3] = float("nan")
    x[:, 4] = x[:, 4].round()                                # ties across and inside groups
    x[40:56, 5] = 9.0                                        # one whole group at the top
    for k in (1, 5, 31):
        vals, rows = neuron._topk_rows(x, k)
        ev, er = neuron._topk_exact(x, k)
        np.testing.assert_array_equal(rows, er)
        np.testing.assert_array_equal(vals, ev)
    assert neuron._topk_rows(x, 5)[1][0, 2] == 2001
    assert neuron._topk_rows(torch.zeros(2000, 0), 3)[1].shape == (3, 0)    # no columns


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
