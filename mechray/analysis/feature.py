"""``feature``: PCA from an exactly merged covariance, and streaming k-means clustering.

Usage::

    from mechray.analysis import get_analysis

    feature = get_analysis("feature", {"n_components": 10, "n_clusters": 8})
    partial = feature.map(rows, entry, layer)            # per shard (Ray fans these out)
    partial = feature.merge(partial, other)              # count, mean, co-moment (float64 merge)
    result = feature.finalize(partial, ctx, layer)
    result["explained_variance_ratio"], result["components_path"], result["clustering"]["sizes"]

PCA: the partial holds the row count, the float64 mean and the co-moment ``sum (x-mean)(x-mean)^T``
merged with Chan's formula, so ``finalize`` gets the covariance of all rows without holding them.
Each shard's co-moment is computed in the rows' own precision (``precision: "float32"``, the
default: one BLAS syrk per block of float32 rows, summed in float64; see
:meth:`Moments.comoment`) and merged across shards in float64.  Its eigenvectors equal
scikit-learn's ``PCA`` on the concatenated rows to float32 precision (explained variance ratios
within rtol 1e-5, components up to sign), with scikit-learn's sign convention (largest-magnitude
loading positive); ``precision: "float64"`` computes the co-moment in float64 (agreement ~1e-9,
about 3x slower).  ``n_clusters: 0`` runs PCA alone.  Components, mean and
explained variance go to ``{out_dir}/feature/{layer}.safetensors`` (``components_path`` is that
path relative to ``out_dir``); without an ``out_dir`` the components are inlined.

Clustering: scikit-learn ``MiniBatchKMeans.partial_fit`` streamed over the layer's shards in
fixed-size batches (``kmeans_epochs`` passes), then one more pass for cluster sizes and total
inertia over every row; the silhouette score is computed on a uniform random sample of rows
(a bottom-k sample kept in the partial, so it merges exactly and does not depend on merge order).
Without a store (uploaded activations) the sample is what gets clustered.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from mechray.analysis.base import (
    JSON_NUMBER,
    Analysis,
    Context,
    Cost,
    Params,
    Skip,
    Workload,
    register,
)
from mechray.analysis.moments import Moments, single_threaded_blas


class FeatureParams(Params):
    n_components: int = Field(10, ge=1, le=1024, description="principal components kept")
    n_clusters: int = Field(8, ge=0, le=1024, description="k-means clusters (0: PCA only)")
    batch_size: int = Field(1024, ge=16, le=65536, description="rows per k-means partial_fit")
    kmeans_epochs: int = Field(1, ge=1, le=20, description="passes over the shards for k-means")
    sample_size: int = Field(2000, ge=10, le=50000, description="rows sampled for silhouette")
    max_features: int = Field(8192, ge=1, le=65536, description="largest d for a d x d covariance")
    seed: int = Field(0, ge=0, le=2 ** 32 - 1, description="k-means and sampling seed")
    precision: Literal["float32", "float64"] = Field(
        "float32", description="per-shard co-moment arithmetic (merged in float64 either way)")

    @field_validator("n_clusters")
    @classmethod
    def _no_single_cluster(cls, v: int) -> int:
        if v == 1:
            raise ValueError("n_clusters=1 is not a clustering: use 2 or more, or 0 for PCA only")
        return v


@register
class FeatureAnalysis(Analysis):
    """PCA (exact mergeable covariance) plus MiniBatchKMeans over shards (kind ``stat``)."""

    name = "feature"
    kind = "stat"
    Params = FeatureParams
    summary = "PCA from the exact merged covariance, plus MiniBatchKMeans clustering"
    columns = (("PC1 ratio", lambda r: r["explained_variance_ratio"][0]),
               ("cumulative ratio", lambda r: sum(r["explained_variance_ratio"])),
               ("components", lambda r: r["n_components"]),
               ("clusters", lambda r: r["clustering"].get("n_clusters", "skipped")),
               ("silhouette", lambda r: r["clustering"].get("silhouette")),
               ("file", lambda r: r.get("components_path")))
    plot_file = "explained_variance.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6, 4))
        for layer, r in per.items():
            ratio = np.cumsum(r["explained_variance_ratio"])
            ax.plot(np.arange(1, len(ratio) + 1), ratio, marker="o", ms=3, label=layer)
        ax.set(xlabel="principal components", ylabel="cumulative explained variance ratio",
               ylim=(0, 1.02), title="PCA explained variance")
        ax.legend(fontsize=7)
        return fig

    @classmethod
    def reads_store(cls, p: FeatureParams) -> bool:
        return p.n_clusters > 0   # k-means streams the shards; PCA does not

    @classmethod
    def answer_bytes(cls, p: FeatureParams, w: Workload) -> float:
        return JSON_NUMBER * (p.n_components * (w.d + 3) + p.n_clusters) \
            + 4096                                   # components [k, d], per-component stats

    @classmethod
    def cost(cls, p: FeatureParams, w: Workload) -> Cost:
        n, d = float(w.rows), float(w.d)
        km = n * d * p.n_clusters * (p.kmeans_epochs + 1)
        return Cost(n * d * d + km + d ** 3, w.shard_rows * d * 8 * 3 + d * d * 8 * 3 +
                    p.sample_size * d * 4 * 2)

    def map(self, rows: torch.Tensor, entry: dict[str, Any], layer: str) -> "FeaturePartial":
        x = rows.reshape(len(rows), -1)
        n, d = x.shape
        if d > self.params.max_features:
            raise Skip(f"layer {layer!r} has {d} features; a {d}x{d} covariance is over "
                       f"max_features={self.params.max_features}: raise it or capture fewer")
        if self.params.precision == "float64" or not x.is_floating_point():
            moments = Moments.of(x.to(torch.float64), full=True)
        else:
            moments = Moments.comoment(x)
        if not self.params.n_clusters:                          # PCA only: no silhouette sample
            return FeaturePartial(moments, np.zeros((0, d), np.float32), np.zeros(0))
        key = zlib.crc32(f"{entry['file']}|{layer}".encode())   # same sample in any merge order
        rng = np.random.default_rng([self.params.seed, key])
        prio = rng.random(n)
        keep = np.sort(np.argsort(prio, kind="stable")[: self.params.sample_size])
        return FeaturePartial(moments, x[torch.from_numpy(keep)].to(torch.float32).numpy(),
                              prio[keep])

    def merge(self, a: "FeaturePartial", b: "FeaturePartial") -> "FeaturePartial":
        if a.n == 0 or b.n == 0:
            return b if a.n == 0 else a
        prio = np.concatenate([a.prio, b.prio])
        keep = np.argsort(prio, kind="stable")[: self.params.sample_size]
        return FeaturePartial(a.moments.merge(b.moments),
                              np.concatenate([a.sample, b.sample])[keep], prio[keep])

    def finalize(self, partial: "FeaturePartial", ctx: Context, layer: str) -> dict[str, Any]:
        n, d = partial.n, len(partial.moments.mean)
        if n < 2:
            raise Skip(f"layer {layer!r} has {n} stored row(s); PCA needs at least 2")
        bad = np.flatnonzero(~np.isfinite(partial.moments.mean) |
                             ~np.isfinite(np.diag(partial.moments.m2)))
        if len(bad):
            raise Skip(f"layer {layer!r} holds NaN or inf values in {len(bad)} of its {d} "
                       f"features (first: {bad[:5].tolist()}); PCA needs finite rows. The "
                       f"'neuron' analysis shows which neurons (min/max); recapture from a "
                       f"checkpoint before the model diverged")
        result = self._pca(partial, ctx, layer)
        result["clustering"] = self._cluster(partial, ctx, layer)
        result["num_samples"], result["num_features"] = int(n), int(d)
        return result

    # --- PCA -----------------------------------------------------------------------------------
    def _pca(self, partial: "FeaturePartial", ctx: Context, layer: str) -> dict[str, Any]:
        n = partial.n
        cov = partial.moments.covariance()
        d = len(cov)
        k = min(self.params.n_components, d, n)
        evals, evecs = top_eigh(cov, k)
        order = np.argsort(evals)[::-1]
        ev = np.clip(evals[order], 0.0, None)
        comps = evecs[:, order].T
        comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]  # sklearn's sign
        total = float(np.trace(cov))
        out: dict[str, Any] = {
            "n_components": int(k), "explained_variance": ev.tolist(),
            "explained_variance_ratio": (ev / total if total > 0 else np.zeros(k)).tolist(),
            "total_variance": total, "singular_values": np.sqrt(ev * (n - 1)).tolist()}
        if k < self.params.n_components:
            out["note"] = f"n_components capped at {k} (features or rows of layer {layer!r})"
        if ctx.out_dir is None:
            out["components"] = comps.tolist()
        else:
            from safetensors.numpy import save_file

            rel = f"feature/{slug(layer)}.safetensors"
            (ctx.out_dir / "feature").mkdir(parents=True, exist_ok=True)
            save_file({"components": np.ascontiguousarray(comps), "mean": partial.moments.mean,
                       "explained_variance": ev}, str(ctx.out_dir / rel))
            out["components_path"] = rel
        return out

    # --- clustering ----------------------------------------------------------------------------
    def _cluster(self, partial: "FeaturePartial", ctx: Context, layer: str) -> dict[str, Any]:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.metrics import pairwise_distances_argmin_min, silhouette_score

        p, n, sample = self.params, partial.n, partial.sample
        if not p.n_clusters:
            return {"skipped": True, "reason": "n_clusters=0 (PCA only)"}
        if n < p.n_clusters:
            return {"skipped": True, "reason": f"{n} rows < n_clusters={p.n_clusters}"}
        km = MiniBatchKMeans(n_clusters=p.n_clusters, batch_size=p.batch_size, random_state=p.seed,
                             n_init=1)
        streamed = ctx.store is not None
        batches = (lambda: row_batches(ctx.store, layer, p.batch_size)) if streamed else \
            (lambda: iter([sample]))
        for _ in range(p.kmeans_epochs):
            for batch in batches():
                km.partial_fit(batch)
        sizes = np.zeros(p.n_clusters, dtype=np.int64)
        inertia = 0.0
        for batch in batches():
            labels, dist = pairwise_distances_argmin_min(batch, km.cluster_centers_)
            sizes += np.bincount(labels, minlength=p.n_clusters)
            inertia += float(np.square(dist, dtype=np.float64).sum())
        labels = km.predict(sample)
        distinct = len(np.unique(labels))
        silhouette = float(silhouette_score(sample, labels, random_state=p.seed)) \
            if 2 <= distinct < len(sample) else None
        return {"method": "MiniBatchKMeans.partial_fit", "n_clusters": p.n_clusters,
                "sizes": sizes.tolist(), "inertia": inertia, "silhouette": silhouette,
                "silhouette_rows": int(len(sample)), "rows": "all" if streamed else "sample",
                "epochs": p.kmeans_epochs}


def row_batches(store, layer: str, batch_size: int) -> Iterator[np.ndarray]:
    """Fixed-size float32 batches of a layer's rows, streamed shard by shard (last may be short)."""
    carry: list[np.ndarray] = []
    held = 0
    for _, rows in store.iter_layer(layer):
        x = rows.reshape(len(rows), -1).to(torch.float32).numpy()
        while len(x):
            take = x[: batch_size - held]
            x = x[len(take):]
            carry.append(take)
            held += len(take)
            if held == batch_size:
                yield np.concatenate(carry) if len(carry) > 1 else carry[0]
                carry, held = [], 0
    if held:
        yield np.concatenate(carry)


def top_eigh(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of a symmetric matrix (LAPACK ``syevr`` for just those, on
    one BLAS thread: the same bits in any process, and fast at these sizes)."""
    from scipy.linalg import eigh

    d = len(cov)
    with single_threaded_blas():
        return eigh(cov, subset_by_index=[d - k, d - 1])


def slug(layer: str) -> str:
    """A file-name-safe form of a layer name (``heads.decoder`` stays ``heads.decoder``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer).strip(".") or "layer"


@dataclass(frozen=True)
class FeaturePartial:
    """The rows' co-moments (for PCA) and a seeded sample of them (for the silhouette): the
    sample keeps the ``sample_size`` rows with the smallest priorities, the same in any merge
    order."""

    moments: Moments
    sample: np.ndarray       # [<= sample_size, d] float32
    prio: np.ndarray         # each sampled row's priority

    @property
    def n(self) -> int:
        return self.moments.n
