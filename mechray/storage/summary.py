"""The per-layer summary a manifest keeps in its head, so listing a store never parses its entries.

Usage::

    from mechray.storage.summary import Summary, layers_from_json

    summary = Summary()
    summary.add(entry)                  # kept current by the manifest owner, entry by entry
    summary.remove(entry)
    doc["summary"] = summary.to_json()  # written before "shards" in manifest.json
    layers = layers_from_json(doc["summary"], "manifest.json")   # what ShardStore.layers() gives

Steps are stored as runs ``[first, last, stride]``: a capture every ``n`` steps is one run, so
the summary of a million shards is a few hundred bytes per layer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MAX_STEPS = 50_000_000  # a hostile summary cannot make a reader expand unbounded ranges
SHAPE = "summary: {'shards': int, 'bytes': int, 'layers': {name: {'feature_shape', 'dtype', " \
        "'shards', 'rows', 'steps': [[first, last, stride], ...]}}}"


class _Layer:
    __slots__ = ("feature_shape", "dtype", "shards", "rows", "steps", "dropped_rows",
                 "provenance_shards")

    def __init__(self) -> None:
        self.feature_shape: list[int] = []
        self.dtype = ""
        self.shards = self.rows = self.dropped_rows = self.provenance_shards = 0
        self.steps: Counter[int] = Counter()


class Summary:
    """Counts per layer (shards, rows, steps) kept up to date as entries come and go."""

    def __init__(self, entries=()) -> None:
        self.layers: dict[str, _Layer] = {}
        self.shards = self.bytes = 0
        for entry in entries:
            self.add(entry)

    def add(self, entry: dict[str, Any], sign: int = 1) -> None:
        self.shards += sign
        self.bytes += sign * entry["bytes"]
        steps = entry.get("steps", [entry["step"]])
        counted = entry.get("dropped_rows")
        dropped: dict[str, Any] = counted if isinstance(counted, dict) else {}
        listed = entry.get("provenance")
        prov: list[Any] = listed if isinstance(listed, list) else []
        for name, info in entry["layers"].items():
            layer = self.layers.get(name)
            if layer is None:
                layer = self.layers[name] = _Layer()
            if sign > 0:
                layer.feature_shape, layer.dtype = list(info["shape"][1:]), info["dtype"]
            layer.shards += sign
            layer.rows += sign * info["shape"][0]
            layer.dropped_rows += sign * int(dropped.get(name, 0) or 0)
            layer.provenance_shards += sign * (name in prov)
            for s in steps:
                layer.steps[s] += sign
                if layer.steps[s] <= 0:
                    del layer.steps[s]
            if layer.shards <= 0:
                del self.layers[name]

    def remove(self, entry: dict[str, Any]) -> None:
        self.add(entry, -1)

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "bytes": self.bytes,
                "layers": {name: {"feature_shape": la.feature_shape, "dtype": la.dtype,
                                  "shards": la.shards, "rows": la.rows,
                                  "dropped_rows": la.dropped_rows,
                                  "provenance_shards": la.provenance_shards,
                                  "steps": runs(sorted(la.steps))}
                           for name, la in sorted(self.layers.items())}}

    def layers_info(self) -> dict[str, dict[str, Any]]:
        """What :meth:`ShardStore.layers` returns, from these counts."""
        return layers_from_json(self.to_json(), "summary")


def runs(steps: list[int]) -> list[list[int]]:
    """Sorted distinct steps as ``[first, last, stride]`` runs (``[s, s, 1]`` for a lone step)."""
    out: list[list[int]] = []
    i = 0
    while i < len(steps):
        first = steps[i]
        if i + 1 == len(steps):
            out.append([first, first, 1])
            break
        stride, j = steps[i + 1] - first, i + 1
        while j + 1 < len(steps) and steps[j + 1] - steps[j] == stride:
            j += 1
        out.append([first, steps[j], stride])
        i = j + 1
    return out


def expand(run_list: list[list[int]]) -> list[int]:
    return [s for first, last, stride in run_list for s in range(first, last + 1, stride)]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def layers_from_json(doc: Any, where: str) -> dict[str, dict[str, Any]]:
    """Per layer ``feature_shape, dtype, shards, rows, steps, dropped_rows,
    provenance_shards``; ``ValueError`` for a wrong shape (checked, sizes included, before
    anything is expanded)."""
    layers = doc.get("layers") if isinstance(doc, dict) else None
    ok = isinstance(layers, dict) and all(
        isinstance(la, dict) and isinstance(la.get("feature_shape"), list) and
        all(_int(d) for d in la["feature_shape"]) and isinstance(la.get("dtype"), str) and
        _int(la.get("shards")) and _int(la.get("rows")) and isinstance(la.get("steps"), list) and
        _int(la.get("dropped_rows", 0)) and _int(la.get("provenance_shards", 0)) and
        all(isinstance(r, list) and len(r) == 3 and all(_int(x) for x in r) and r[2] > 0 and
            r[1] >= r[0] for r in la["steps"])
        for la in layers.values())
    if not ok or layers is None:
        raise ValueError(f"{where}: the summary is not {SHAPE}")
    if sum((r[1] - r[0]) // r[2] + 1 for la in layers.values() for r in la["steps"]) > MAX_STEPS:
        raise ValueError(f"{where}: the summary lists more than {MAX_STEPS} steps")
    return {name: {"feature_shape": la["feature_shape"], "dtype": la["dtype"],
                   "shards": la["shards"], "rows": la["rows"], "steps": expand(la["steps"]),
                   "dropped_rows": la.get("dropped_rows", 0),
                   "provenance_shards": la.get("provenance_shards", 0)}
            for name, la in layers.items()}
