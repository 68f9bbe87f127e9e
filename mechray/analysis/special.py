"""Special-token rows ([CLS], [SEP], BOS, EOS, PAD) left out of analysis, for stores that kept them.

Usage::

    from mechray.analysis.special import analysis_token_ids, SpecialRowsStore

    ids = analysis_token_ids(config, tokenizer)     # () when off or unknown
    Engine(store, skip_token_ids=ids)               # neuron stats, top-k, SAE rows, contexts
    EvalMechIntRunner(model, config, tokenizer=tok) # does this for you (config default: on)

Capture already leaves these rows out when it knows the tokenizer
(``MechIntConfig.exclude_special_tokens``, on by default); a store captured without one (a
Lightning callback given no ``tokenizer``, an older store, ``exclude_special_tokens=False`` at
capture) still holds them, and on BERT-style models they dominate every top-activation list
(MiniLM's ``[CLS]`` outlier dimension).  At analysis time the same setting, with the
tokenizer's ``all_special_ids`` (or ``config.special_token_ids``), drops rows whose stored
token (shard provenance) is one of those ids before any analysis sees them.

:class:`SpecialRowsStore` wraps a :class:`~mechray.storage.reader.ShardStore`: its
``payloads``/``iter_layer`` give each layer with token provenance without those rows (its
``row_steps``, ``row_positions`` and provenance cut the same way) and record the kept rows'
indices in the shard as ``metadata["row_index"][layer]``, so a result that names a row
(``neuron`` top-k, SAE top activations) still names the row in the shard file, and token
contexts read the right token.  Rows without provenance are kept.  Row counts in the manifest
(``layers()``) still count the dropped rows.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

__all__ = ["SpecialRowsStore", "analysis_token_ids", "drop_special_rows", "original_rows"]


def analysis_token_ids(config: Any, tokenizer: Any = None) -> tuple[int, ...]:
    """The token ids whose rows analysis leaves out: ``config.special_token_ids``, else the
    tokenizer's ``all_special_ids``; ``()`` when ``config.exclude_special_tokens`` is off or
    neither is known (a plain decode callable has none)."""
    from mechray.capture.sampler import special_token_ids

    ids = special_token_ids(config, tokenizer)
    return () if ids is None else tuple(sorted({int(i) for i in ids.tolist()}))


def drop_special_rows(payload: dict[str, Any], ids: Sequence[int],
                      layers: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """A shallow copy of a shard ``payload`` without the rows whose provenance token is in
    ``ids`` (in ``layers``, default all); the kept rows' shard indices go to
    ``metadata["row_index"][layer]``.  The payload itself is not changed."""
    prov = payload.get("provenance") or {}
    if not ids or not prov:
        return payload
    wanted = set(layers) if layers is not None else None
    id_t = torch.tensor(list(ids), dtype=torch.int64)
    acts = dict(payload.get("activations", {}))
    meta = dict(payload.get("metadata", {}))
    new_prov = dict(prov)
    per_meta = {key: dict(meta.get(key) or {}) for key in ("row_steps", "row_positions")}
    row_index = dict(meta.get("row_index") or {})
    for layer, companions in prov.items():
        if (wanted is not None and layer not in wanted) or layer not in acts:
            continue
        token = companions.get("token") if isinstance(companions, dict) else None
        rows = acts[layer]
        if token is None or len(token) != len(rows):
            continue
        keep = ~torch.isin(token.to(torch.int64), id_t)
        if bool(keep.all()):
            continue
        idx = keep.nonzero().flatten()
        acts[layer] = rows[idx]
        new_prov[layer] = {k: v[idx] for k, v in companions.items()}
        for table in per_meta.values():
            col = table.get(layer)
            if col is not None and len(col) == len(keep):
                table[layer] = torch.as_tensor(col)[idx]
        before = row_index.get(layer)
        row_index[layer] = torch.as_tensor(before)[idx] if before is not None else idx
    meta.update(per_meta, row_index=row_index)
    return {**payload, "activations": acts, "metadata": meta, "provenance": new_prov}


def original_rows(rows: Any, row_index: Any) -> Any:
    """Shard row numbers of ``rows`` (indices into a filtered layer), given the layer's
    ``row_index`` (``None``: nothing was filtered, ``rows`` as they are)."""
    if row_index is None:
        return rows
    import numpy as np

    return np.asarray(row_index, dtype=np.int64)[np.asarray(rows, dtype=np.int64)]


class SpecialRowsStore:
    """A store whose shard payloads leave out special-token rows (module docstring); every
    other attribute is the wrapped store's."""

    def __init__(self, store: Any, ids: Sequence[int]):
        self._store = store
        self.skip_token_ids = tuple(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @property
    def unfiltered(self) -> Any:
        return self._store

    def payloads(self, shards: Iterable[Any], ahead: int = 1
                 ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        reading = self._store.payloads(shards, ahead)
        try:
            for entry, payload in reading:
                yield entry, drop_special_rows(payload, self.skip_token_ids)
        finally:
            reading.close()

    def load(self, shard: Any, mmap: bool = True) -> dict[str, Any]:
        return drop_special_rows(self._store.load(shard, mmap=mmap), self.skip_token_ids)

    def iter_layer(self, layer: str, steps: Optional[list[int]] = None
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """``(entry, rows)`` per shard holding ``layer``, special-token rows left out."""
        from mechray.storage.reader import steps_of

        self._store.check_layer(layer)
        picked = [e for e in self._store.shards(layer) if steps is None or
                  set(steps_of(e)) & set(steps)]
        for entry, payload in self.payloads(picked):
            yield entry, payload["activations"][layer]


def filtered(store: Any, ids: Sequence[int]) -> Any:
    """``store`` wrapped in :class:`SpecialRowsStore` when ``ids`` is not empty."""
    return SpecialRowsStore(store, ids) if ids else store
