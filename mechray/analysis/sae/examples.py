"""Top-activating rows per SAE latent, as a mergeable statistic over shards.

Usage::

    from mechray.analysis.sae.examples import LatentExamples

    stat = LatentExamples(sae, latents=[3, 17, 40], k=5)
    partial = None
    for entry, rows, steps in shards:                 # any order, any merge tree
        p = stat.map(rows, entry["file"], steps)
        partial = p if partial is None else stat.merge(partial, p)
    stat.finalize(partial)   # {"latents": [...], "k": 5, "values"/"shard"/"row"/"step": [L][k]}

For every chosen latent, the ``k`` rows where its code is largest, with the shard file, the row
in that shard and the training step of the row (``-1`` when the shard has no per-row steps).
Candidates are re-ranked by (value desc, shard file, row), so the merged result is the same
whatever the shard order or merge tree, exactly as ``neuron``'s ``top_k``.  Rows where a latent
is inactive (code 0) are never listed, so a latent may have fewer than ``k`` rows.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from mechray.analysis.sae.model import SparseAutoencoder
from mechray.analysis.special import original_rows


class LatentExamples:
    """map / merge / finalize over shards for the top-``k`` rows of each latent in ``latents``."""

    def __init__(self, sae: SparseAutoencoder, latents: list[int], k: int = 5,
                 batch_size: int = 4096):
        self.sae, self.latents, self.k, self.batch_size = sae, list(latents), k, batch_size
        self._index = torch.as_tensor(self.latents, dtype=torch.long)

    @torch.no_grad()
    def map(self, rows: torch.Tensor, file: str, steps: Optional[Any] = None
            ) -> dict[str, Any]:
        rows = rows.reshape(len(rows), -1)
        dev = self.sae.W_dec.device
        idx = self._index.to(dev)
        best_v: Optional[torch.Tensor] = None
        best_r: Optional[torch.Tensor] = None
        for i in range(0, len(rows), self.batch_size):
            z = self.sae.encode(rows[i:i + self.batch_size].to(dev, torch.float32))[:, idx]
            r = torch.arange(i, i + len(z), device=dev)[:, None].expand_as(z)
            if best_v is not None and best_r is not None:
                z, r = torch.cat([best_v, z]), torch.cat([best_r, r])
            kk = min(self.k, len(z))
            # ties broken by the lowest row: sort by row first, then a stable sort by value
            order = torch.argsort(r, dim=0, stable=True)
            z, r = z.gather(0, order), r.gather(0, order)
            top = torch.argsort(-z, dim=0, stable=True)[:kk]
            best_v, best_r = z.gather(0, top), r.gather(0, top)
        if best_v is None or best_r is None:
            return self._empty()
        vals, rix = best_v.double().cpu().numpy(), best_r.cpu().numpy().astype(np.int64)
        if steps is not None and len(steps) == len(rows):
            stp = np.asarray(steps, dtype=np.int64)[rix]
        else:
            stp = np.full(rix.shape, -1, dtype=np.int64)
        return {"files": [file], "val": vals, "file": np.zeros_like(rix), "row": rix,
                "step": stp}

    def _empty(self) -> dict[str, Any]:
        shape = (0, len(self.latents))
        return {"files": [], "val": np.zeros(shape), "file": np.zeros(shape, np.int64),
                "row": np.zeros(shape, np.int64), "step": np.zeros(shape, np.int64)}

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        files = sorted(set(a["files"]) | set(b["files"]))
        where = {f: i for i, f in enumerate(files)}
        remap = [np.asarray([where[f] for f in p["files"]], dtype=np.int64) for p in (a, b)]
        val = np.concatenate([a["val"], b["val"]])
        fil = np.concatenate([remap[0][a["file"]] if len(a["files"]) else a["file"],
                              remap[1][b["file"]] if len(b["files"]) else b["file"]])
        row = np.concatenate([a["row"], b["row"]])
        stp = np.concatenate([a["step"], b["step"]])
        order = np.lexsort((row, fil, -val), axis=0)[: self.k]
        pick = lambda arr: np.take_along_axis(arr, order, axis=0)  # noqa: E731
        return {"files": files, "val": pick(val), "file": pick(fil), "row": pick(row),
                "step": pick(stp)}

    def finalize(self, partial: dict[str, Any]) -> dict[str, Any]:
        files = np.asarray(partial["files"] or [""], dtype=object)
        out: dict[str, Any] = {"latents": self.latents, "k": self.k, "values": [], "shard": [],
                               "row": [], "step": []}
        for j in range(len(self.latents)):
            live = partial["val"][:, j] > 0
            out["values"].append(partial["val"][live, j].tolist())
            out["shard"].append(files[partial["file"][live, j]].tolist())
            out["row"].append(partial["row"][live, j].tolist())
            out["step"].append(partial["step"][live, j].tolist())
        return out


def top_activations(sae: SparseAutoencoder, store: Any, layer: str, result: dict[str, Any],
                    p: Any) -> Optional[dict[str, Any]]:
    """The ``k_examples`` top rows of ``p.latents`` (or of the ``p.top_latents`` latents most
    often active on held-out rows) over every shard of ``layer``; ``None`` when none asked."""
    return top_activations_each([(sae, result, p)], store, layer)[0]


def top_activations_each(fits: list[tuple[SparseAutoencoder, dict[str, Any], Any]], store: Any,
                         layer: str) -> list[Optional[dict[str, Any]]]:
    """:func:`top_activations` of several SAEs ``(sae, result, params)`` of one layer, on one
    read of its shards (a sweep's SAEs)."""
    stats = [_examples(sae, result, p) for sae, result, p in fits]
    partials: list[Optional[dict[str, Any]]] = [None] * len(stats)
    if any(s is not None for s in stats):
        for entry in store.shards(layer):
            payload = store.load(entry)
            steps = payload.get("metadata", {}).get("row_steps", {}).get(layer)
            index = (payload.get("metadata", {}).get("row_index") or {}).get(layer)
            for i, stat in enumerate(stats):
                if stat is not None:
                    part = stat.map(payload["activations"][layer], entry["file"], steps)
                    if index is not None:   # special-token rows left out: the shard's own rows
                        part["row"] = original_rows(part["row"], index)
                    old = partials[i]
                    partials[i] = part if old is None else stat.merge(old, part)
    return [None if stat is None else stat.finalize(part if part is not None else stat._empty())
            for stat, part in zip(stats, partials)]


def _examples(sae: SparseAutoencoder, result: dict[str, Any], p: Any
              ) -> Optional[LatentExamples]:
    """The statistic for the latents ``p`` asks about, or None when it asks for none."""
    if p.latents is not None:
        bad = [i for i in p.latents if not 0 <= i < sae.n_latents]
        if bad:
            from mechray.analysis.base import AnalysisParamsError

            raise AnalysisParamsError(f"bad parameters for analysis 'sae': latents {bad[:5]} "
                                      f"are outside 0..{sae.n_latents - 1}; pick latent "
                                      f"indices below n_latents")
        latents = list(p.latents)
    elif p.top_latents:
        freq = [(-1e9 if f is None else f, -i) for i, f in
                enumerate(result["latent_log10_frequency"])]
        order = sorted(range(len(freq)), key=lambda i: freq[i], reverse=True)
        latents = [i for i in order if result["latent_log10_frequency"][i] is not None]
        latents = latents[: p.top_latents]
    else:
        return None
    return LatentExamples(sae, latents, p.k_examples, p.batch_size) if latents else None


def report_examples(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: ``latent i: shard:row (step s) code; ...`` per layer that has them."""
    out = []
    for layer, r in rows:
        top = r.get("top_activations") or {}
        if not top.get("latents"):
            continue
        out += ["", f"Top-activating rows of `{layer}` (shard:row, step, code):", ""]
        for j, latent in enumerate(top["latents"]):
            hits = [f"{sh}:{row} (step {st}) {v:.3g}" for v, sh, row, st in
                    zip(top["values"][j], top["shard"][j], top["row"][j], top["step"][j])]
            out.append(f"- latent {latent}: " + ("; ".join(hits) or "never active"))
    return out
