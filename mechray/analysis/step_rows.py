"""A layer's rows grouped by saved training step, paired across steps when the store allows it.

Usage::

    from mechray.analysis.step_rows import StepRows

    rows = StepRows.read(store, "popt", training_steps=None, step_groups=None, pairing="auto",
                         max_rows=None)
    rows.groups            # [[0], [100], [200], ...]: saved steps per group, in order
    rows.x[g]              # float32 [rows, d] of group g
    rows.where[g]          # (shard file, row in that shard, step) of each row, for examples
    rows.paired            # None, or int64 [inputs, groups]: row index of input i in group g

Rows are grouped by ``metadata.row_steps`` (the shard's step when absent).  ``training_steps``
keeps those saved steps only (an unknown step is an error naming the saved ones);
``step_groups=G`` joins consecutive saved steps into ``G`` groups of as equal a count of steps as
possible.  Pairing (as ``dynamics``'s CKA): with ``pairing="auto"`` rows of shards whose stored
inputs are byte-identical (a probe batch captured at every save, ``MechIntCallback(probe_inputs=
...)``) are matched by (inputs, occurrence, ``row_positions``); ``"positions"`` trusts that every
shard saw the same inputs in the same order; ``"none"`` never pairs.  An input is paired when it
has a row in every group; rows without a partner in every group are left out of ``paired``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mechray.analysis.base import Skip
from mechray.analysis.dynamics import _column, _inputs_key, _keyed
from mechray.errors import AnalysisParamsError

MIN_PAIRED = 64        # fewer paired inputs than this: train on the rows of each step instead


@dataclass
class StepRows:
    """Rows of one layer per step group (see the module docstring)."""

    layer: str
    groups: list[list[int]]                  # saved steps of each group
    x: list[torch.Tensor]                    # float32 [rows_g, d] per group
    where: list[list[tuple[str, int, int]]]  # (shard file, row in shard, step) per row
    paired: Optional[np.ndarray]             # int64 [inputs, groups] or None
    pairing: str                             # "same_inputs" | "positions" | "unpaired"
    available: int                           # rows stored for the chosen steps
    d: int

    @property
    def labels(self) -> list[int]:
        """The first saved step of each group (what a birth step is reported as)."""
        return [g[0] for g in self.groups]

    @classmethod
    def read(cls, store: Any, layer: str, training_steps: Optional[list[int]] = None,
             step_groups: Optional[int] = None, pairing: str = "auto",
             max_rows: Optional[int] = None) -> "StepRows":
        store.check_layer(layer)
        per_step: dict[int, list[tuple[Optional[str], np.ndarray, torch.Tensor, list]]] = {}
        wanted = None if training_steps is None else set(training_steps)
        for entry in store.shards(layer):
            have = set(entry.get("steps", [entry["step"]]))
            if wanted is not None and not have & wanted:
                continue
            payload = store.load(entry)
            rows = payload["activations"][layer]
            rows = rows.reshape(len(rows), -1)
            meta = payload.get("metadata", {})
            steps = _column(meta.get("row_steps", {}).get(layer), len(rows), entry["step"])
            pos = _column(meta.get("row_positions", {}).get(layer), len(rows), None)
            key = _inputs_key(payload) if pairing == "auto" else \
                "all" if pairing == "positions" else None
            for step in np.unique(steps):
                if wanted is not None and int(step) not in wanted:
                    continue
                idx = np.flatnonzero(steps == step)
                per_step.setdefault(int(step), []).append(
                    (key, pos[idx], rows[torch.as_tensor(idx)].float(),
                     [(entry["file"], int(i), int(step)) for i in idx]))
        saved = sorted(per_step)
        if wanted is not None and wanted - set(saved):
            raise AnalysisParamsError(
                f"training_steps {sorted(wanted - set(saved))} have no rows of layer {layer!r}; "
                f"its saved steps are {_steps_text(store, layer)}; pick among them or leave "
                f"training_steps unset for all")
        if len(saved) < 2:
            raise Skip(f"layer {layer!r} has rows from {len(saved)} saved step(s) {saved}; "
                       f"features across training need at least 2")
        groups = _group(saved, step_groups)
        x, where, keyed = [], [], []
        available = 0
        for g in groups:
            parts = [p for s in g for p in per_step[s]]
            available += sum(len(p[2]) for p in parts)
            cap = max_rows if max_rows is not None else None
            rows = torch.cat([p[2] for p in parts])[:cap]
            x.append(rows)
            where.append([w for p in parts for w in p[3]][:cap])
            keyed.append(_keys_of(parts, cap))
        paired = _pair(keyed) if pairing != "none" else None
        mode = "unpaired" if paired is None else \
            "same_inputs" if pairing == "auto" else "positions"
        return cls(layer, groups, x, where, paired, mode, available, int(x[0].shape[1]))

    def split(self, fraction: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group, a seeded (train, held-out) split of row indices (``fraction`` held out)."""
        train, held = [], []
        for g, rows in enumerate(self.x):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(str(g).encode()))
            perm = torch.randperm(len(rows), generator=gen)
            n_hold = max(1, round(fraction * len(rows))) if len(rows) > 1 else 0
            held.append(perm[:n_hold].sort().values)
            train.append(perm[n_hold:].sort().values)
        return train, held


def _group(saved: list[int], n: Optional[int]) -> list[list[int]]:
    if n is None or n >= len(saved):
        return [[s] for s in saved]
    if n < 2:
        raise AnalysisParamsError(f"step_groups={n}: give 2 or more (or leave it unset for one "
                                  f"group per saved step)")
    bounds = np.linspace(0, len(saved), n + 1).round().astype(int)
    return [saved[a:b] for a, b in zip(bounds, bounds[1:])]


def _keys_of(parts: list, cap: Optional[int]) -> Optional[dict[int, int]]:
    """``{pairing key: row index in the group}`` for the rows that have inputs, or None."""
    out: dict[int, int] = {}
    start = 0
    by_key: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for key, pos, rows, _ in parts:
        if key is not None:
            by_key.setdefault(key, []).append((pos, np.arange(start, start + len(rows))))
        start += len(rows)
    if not by_key:
        return None
    for digest, chunk in sorted(by_key.items()):
        keys, index = _keyed(chunk)
        salt = zlib.crc32(digest.encode()) << 40
        for k, i in zip(keys.tolist(), index.tolist()):
            if cap is None or i < cap:
                out[salt + int(k)] = int(i)
    return out


def _pair(keyed: list[Optional[dict[int, int]]]) -> Optional[np.ndarray]:
    if any(k is None for k in keyed):
        return None
    maps = [k for k in keyed if k is not None]
    common = sorted(set(maps[0]).intersection(*maps[1:]))
    if len(common) < MIN_PAIRED:
        return None
    return np.asarray([[m[c] for m in maps] for c in common], dtype=np.int64)


def _steps_text(store: Any, layer: str) -> str:
    steps = sorted({s for e in store.shards(layer) for s in e.get("steps", [e["step"]])})
    return str(steps if len(steps) <= 20 else steps[:10] + ["..."] + steps[-5:])
