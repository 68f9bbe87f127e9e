"""``dynamics``: how a layer's representation drifts between saved training steps.

Usage::

    from mechray.analysis import get_analysis

    dyn = get_analysis("dynamics", {"n_components": 5})
    result = dyn.fit(ctx, "popt")           # walks ctx.store's shards of the layer
    result["steps"], result["subspace_overlap"], result["cka"], result["cka_pairing"]

For consecutive saved steps ``(s, t)`` of one layer (rows grouped by ``metadata.row_steps``):

``subspace_overlap``
    ``||U_s^T U_t||_F^2 / k`` for the top-``k`` principal subspaces of each step's rows (1: the
    same subspace, ``k/d`` expected for random ones; ``subspace_k`` is the ``k`` used, capped by
    the layer width and row count, and a ``k = d`` overlap is trivially 1).  It compares the
    same neurons' covariance at two steps, so it needs no row pairing: it is always computed.
    Covariances merge exactly (Chan, float64, :class:`~mechray.analysis.moments.Moments`) across
    all shards of a step.

``cka``
    Linear CKA (Kornblith et al. 2019) ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on centred,
    *paired* rows: row ``i`` of ``X`` and of ``Y`` must be the same input seen by the model at
    step ``s`` and at step ``t``.  Rows captured from different training batches are not paired
    and CKA between them is meaningless, so it is computed only when pairing is established:

    - ``pairing="auto"`` (default): shards saved with their inputs (``save_inputs=True``) whose
      stored inputs are byte-identical at both steps (a fixed probe batch run at every saved
      step) are matched, and their rows aligned by ``row_positions`` (``cka_pairing:
      "same_inputs"``);
    - ``pairing="positions"``: the user asserts each step saw the same inputs in the same order;
      rows of the two steps are aligned by ``row_positions`` (``"positions"``);
    - otherwise ``cka`` is ``None`` for that pair with ``cka_pairing: "unpaired"``.

    At most ``max_rows`` rows per step and input group are kept (the first in capture order, so
    both steps keep the same ones) and at most ``max_rows`` aligned rows enter each CKA.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from mechray.analysis.base import (
    Analysis,
    Context,
    Cost,
    Params,
    Skip,
    Workload,
    register,
)
from mechray.analysis.moments import Moments
from mechray.analysis.render import series, span


class DynamicsParams(Params):
    n_components: int = Field(5, ge=1, le=512, description="k of the top-k principal subspaces")
    pairing: Literal["auto", "positions", "none"] = "auto"
    max_rows: int = Field(4096, ge=8, le=200000, description="paired rows per CKA at most")
    max_features: int = Field(8192, ge=1, le=65536, description="largest d for a d x d covariance")


@register
class Dynamics(Analysis):
    """Training dynamics per layer (kind ``fit``: one pass over the layer's shards)."""

    name = "dynamics"
    kind = "fit"
    Params = DynamicsParams
    summary = "drift across training steps: principal-subspace overlap and linear CKA"
    columns = (("steps", lambda r: span(r["steps"])),
               ("min overlap", lambda r: min(r["subspace_overlap"])),
               ("CKA", lambda r: series(r["cka"])),
               ("pairing", lambda r: ", ".join(sorted(set(r["cka_pairing"])))))
    plot_file = "dynamics.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for layer, r in per.items():
            later = [t for _, t in r["pairs"]]
            a.plot(later, r["subspace_overlap"], marker="o", ms=3, label=layer)
            cka = [np.nan if c is None else c for c in r["cka"]]
            if not all(np.isnan(cka)):
                b.plot(later, cka, marker="o", ms=3, label=layer)
        a.set(xlabel="step", ylabel="overlap with previous step", ylim=(0, 1.02),
              title=f"top-{next(iter(per.values()))['n_components']} principal subspace overlap")
        b.set(xlabel="step", ylabel="linear CKA with previous step", ylim=(0, 1.02),
              title="linear CKA (paired rows only)")
        a.legend(fontsize=7)
        if b.lines:
            b.legend(fontsize=7)
        else:
            b.text(0.5, 0.5, "no paired rows between steps\n(capture a fixed probe batch\n"
                   "with save_inputs=True)", ha="center", va="center", transform=b.transAxes)
        return fig

    @classmethod
    def cost(cls, p: DynamicsParams, w: Workload) -> Cost:
        n, d = float(w.rows), float(w.d)
        return Cost(n * d * d + w.steps * d ** 3, w.shard_rows * d * 8 * 3 + (w.steps + 2) * d * d * 8)

    def fit(self, ctx: Context, layer: str) -> dict[str, Any]:
        if ctx.store is None:
            raise Skip("dynamics needs a shard store with several saved steps")
        ctx.store.check_layer(layer)
        p = self.params
        cov: dict[int, Moments] = {}               # step -> its rows' moments
        paired: dict[int, dict[str, list]] = {}    # step -> {group key -> [(positions, rows)]}
        for entry in ctx.store.shards(layer):
            payload = ctx.store.load(entry)
            rows = payload["activations"][layer]
            x = rows.reshape(len(rows), -1).to(torch.float64).numpy()
            if x.shape[1] > p.max_features:
                raise Skip(f"layer {layer!r} has {x.shape[1]} features, over max_features="
                           f"{p.max_features}")
            meta = payload.get("metadata", {})
            steps = _column(meta.get("row_steps", {}).get(layer), len(x), entry["step"])
            pos = _column(meta.get("row_positions", {}).get(layer), len(x), None)
            key = _inputs_key(payload) if p.pairing == "auto" else "all"
            for step in np.unique(steps):
                sel = steps == step
                _add_cov(cov, int(step), x[sel])
                group = paired.setdefault(int(step), {}).setdefault(key, []) \
                    if key is not None and p.pairing != "none" else None
                room = p.max_rows - sum(len(q) for q, _ in group) if group is not None else 0
                if group is not None and room > 0:  # the first max_rows rows in capture order
                    group.append((pos[sel][:room], x[sel][:room]))
        saved = sorted(cov)
        if len(saved) < 2:
            raise Skip(f"layer {layer!r} has rows from {len(saved)} saved step(s) {saved}; "
                       "dynamics needs at least 2")
        bases = {s: _top_subspace(cov[s], p.n_components) for s in saved}
        overlap, ks, cka, pairing, cka_rows = [], [], [], [], []
        for s, t in zip(saved, saved[1:]):
            k = min(bases[s].shape[1], bases[t].shape[1])
            ks.append(k)
            overlap.append(float(np.square(bases[s][:, :k].T @ bases[t][:, :k]).sum() / k))
            x, y = self._align(paired.get(s, {}), paired.get(t, {}))
            value = _linear_cka(x, y) if x is not None and y is not None else None
            cka.append(value)
            cka_rows.append(0 if x is None else int(len(x)))
            pairing.append("unpaired" if x is None else
                           "same_inputs" if p.pairing == "auto" else "positions")
        return {"steps": saved, "rows_per_step": [int(cov[s].n) for s in saved],
                "total_variance": [float(np.trace(cov[s].covariance()))
                                   for s in saved],
                "pairs": [[s, t] for s, t in zip(saved, saved[1:])],
                "subspace_overlap": overlap, "n_components": p.n_components, "subspace_k": ks,
                "cka": cka, "cka_pairing": pairing, "cka_rows": cka_rows,
                "pairing_mode": p.pairing}

    def _align(self, a: dict[str, list], b: dict[str, list]
               ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Rows of two steps aligned by (input group, occurrence, position); ``None`` if none."""
        xs, ys = [], []
        for key in sorted(set(a) & set(b)):
            ka, ra = _keyed(a[key])
            kb, rb = _keyed(b[key])
            common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
            xs.append(ra[ia])
            ys.append(rb[ib])
        if not xs or sum(len(x) for x in xs) < 3:
            return None, None
        cap = self.params.max_rows
        return np.concatenate(xs)[:cap], np.concatenate(ys)[:cap]


def _column(values: Any, n: int, default: Optional[int]) -> np.ndarray:
    if values is not None and len(values) == n:
        return np.asarray(values, dtype=np.int64)
    return np.full(n, default, dtype=np.int64) if default is not None else np.arange(n)


def _inputs_key(payload: dict[str, Any]) -> Optional[str]:
    """A digest of a shard's stored inputs (``None`` without inputs): equal digest, same inputs."""
    inputs = payload.get("inputs")
    items = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
    parts = [(k, t) for k, t in items if isinstance(t, torch.Tensor)]
    if not parts or len(parts) != len(items):
        return None
    h = hashlib.sha256()
    for key, t in parts:                       # keyword inputs (model(**enc)): every key
        t = t.detach().contiguous()
        h.update(f"{key}{t.dtype}{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _keyed(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Unique sort keys (occurrence * span + position) for rows in capture order, sorted."""
    pos = np.concatenate([q for q, _ in parts])
    rows = np.concatenate([r for _, r in parts])
    order = np.lexsort((np.arange(len(pos)), pos))        # by position, then capture order
    sp = pos[order]
    start = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    occurrence = np.arange(len(sp)) - np.repeat(start, np.diff(np.r_[start, len(sp)]))
    keys = occurrence * (int(pos.max()) + 1) + sp
    by_key = np.argsort(keys, kind="stable")
    return keys[by_key], rows[order][by_key]


def _add_cov(cov: dict[int, Moments], step: int, x: np.ndarray) -> None:
    if len(x) == 0:
        return
    m = Moments.of(x, full=True)
    cov[step] = cov[step].merge(m) if step in cov else m


def _top_subspace(c: Moments, k: int) -> np.ndarray:
    evals, evecs = np.linalg.eigh(c.m2)
    k = min(k, len(evals), max(int(c.n) - 1, 1))
    return evecs[:, np.argsort(evals)[::-1][:k]]


def _linear_cka(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    x = x - x.mean(0)
    y = y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.square(y.T @ x).sum() / den) if den > 0 else None
