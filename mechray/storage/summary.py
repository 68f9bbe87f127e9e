"""The per-layer summary a manifest keeps in its head, so listing a store never parses its entries.

Usage::

    from mechray.storage.summary import Summary, layer_summaries

    summary = Summary()
    summary.add(entry)                  # kept current by the manifest owner, entry by entry
    summary.remove(entry)
    head["summary"] = summary.to_json()  # in manifest.json's head and each journal commit
    layers = layer_summaries(head["summary"], "manifest.json")   # {name: LayerSummary}

Steps are stored as runs ``[first, last, stride]``: a capture every ``n`` steps is one run, so
the summary of a million shards is a few hundred bytes per layer; read back, they stay runs
(:class:`Steps`), so a forged head claiming 10^7 steps costs nothing to hold or to page.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain, islice
from typing import Annotated, Any, Optional, overload

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from mechray.storage.entry import LayerSummary, steps_of

MAX_STEPS = 50_000_000  # held as runs (:class:`Steps`), but `layers()` lists them: bounded
SHAPE = "summary: {'shards': int, 'bytes': int, 'layers': {name: {'feature_shape', 'dtype', " \
        "'shards', 'rows', 'steps': [[first, last, stride], ...]}}}"


class _Layer:
    __slots__ = ("feature_shape", "dtype", "shards", "rows", "steps", "dropped_rows",
                 "provenance_shards", "sizes", "runs")

    def __init__(self) -> None:
        self.feature_shape: list[int] = []
        self.dtype = ""
        self.shards = self.rows = self.dropped_rows = self.provenance_shards = 0
        self.steps: Counter[int] = Counter()
        self.sizes: Counter[int] = Counter()   # shards per row count: the largest one is known
        self.runs: Optional[list[list[int]]] = []  # the steps as runs; None: recompute

    def step(self, s: int, sign: int) -> None:
        """Count step ``s`` once more (``sign`` 1) or once less (-1), keeping the runs current
        when a new step comes after the last one (a capture's usual order: O(1) per commit,
        not a sort of every step); anything else has them recomputed when next asked for."""
        _bump(self.steps, s, sign)
        fresh = sign > 0 and self.steps[s] == 1
        if not fresh and self.steps.get(s, 0) > 0:
            return                                    # a step already counted: runs unchanged
        if not fresh or self.runs is None or (self.runs and s <= self.runs[-1][1]):
            self.runs = None
        elif not self.runs:
            self.runs.append([s, s, 1])
        else:
            last = self.runs[-1]
            if last[0] == last[1]:                    # a lone step: it and s make a run
                last[1], last[2] = s, s - last[0]
            elif s - last[1] == last[2]:
                last[1] = s
            else:
                self.runs.append([s, s, 1])

    def step_runs(self) -> list[list[int]]:
        if self.runs is None:
            self.runs = runs(sorted(self.steps))
        return [list(r) for r in self.runs]


def _bump(counter: Counter[int], key: int, sign: int) -> None:
    counter[key] += sign
    if counter[key] <= 0:
        del counter[key]


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
        steps = steps_of(entry)
        dropped = entry.get("dropped_rows") or {}
        prov = entry.get("provenance") or []
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
            _bump(layer.sizes, info["shape"][0], sign)
            for s in steps:
                layer.step(s, sign)
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
                                  "max_shard_rows": max(la.sizes, default=0),
                                  "steps": la.step_runs()}
                           for name, la in sorted(self.layers.items())}}

    def summaries(self) -> dict[str, LayerSummary]:
        """What :meth:`ShardStore.summaries` returns, from these counts."""
        return layer_summaries(self.to_json(), "summary")


def runs(steps: Iterable[int]) -> list[list[int]]:
    """Sorted steps (repeats skipped) as ``[first, last, stride]`` runs (``[s, s, 1]`` for a lone
    step), in one pass: an iterator of 10^7 steps is never listed."""
    out: list[list[int]] = []
    for s in steps:
        if not out:
            out.append([s, s, 1])
            continue
        last = out[-1]
        if s == last[1]:
            continue
        if last[0] == last[1]:                        # a lone step: it and s make a run
            last[1], last[2] = s, s - last[0]
        elif s - last[1] == last[2]:
            last[1] = s
        else:
            out.append([s, s, 1])
    return out


class Steps(Sequence[int]):
    """Sorted steps held as their runs: ``len``, indexing, slicing and iteration without
    listing them, so a summary claiming 10^7 steps costs its runs, not 10^7 integers.

    Usage::

        steps = Steps([[0, 990, 10], [1000, 1000, 1]])
        len(steps), steps[-1], steps[:3], list(steps) == [0, 10, ..., 1000]
    """

    __slots__ = ("_runs", "_ends")

    def __init__(self, run_list: list[list[int]]) -> None:
        self._runs = [range(first, last + 1, stride) for first, last, stride in run_list]
        self._ends = list(accumulate(len(r) for r in self._runs))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return list(islice(self, start, max(start, stop)))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"step index {i} out of range for {n} steps")
        i %= n
        k = bisect_right(self._ends, i)
        return self._runs[k][i - (self._ends[k - 1] if k else 0)]

    def __iter__(self) -> Iterator[int]:
        return chain.from_iterable(self._runs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Steps):
            return self._runs == other._runs or (len(self) == len(other) and
                                                 all(a == b for a, b in zip(self, other)))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # (compares equal to lists)

    def __repr__(self) -> str:
        head = ", ".join(map(str, self[:8]))
        return f"Steps([{head}{', ...' if len(self) > 8 else ''}] ({len(self)} steps))"


def expand(run_list: list[list[int]]) -> Steps:
    return Steps(run_list)


class _Runs(BaseModel):
    """A layer as the summary stores it (steps as runs), checked before anything is expanded."""

    model_config = ConfigDict(strict=True, extra="ignore")
    feature_shape: list[StrictInt]
    dtype: StrictStr
    shards: StrictInt
    rows: StrictInt
    steps: list[Annotated[list[StrictInt], Field(min_length=3, max_length=3)]]
    dropped_rows: StrictInt = 0
    provenance_shards: StrictInt = 0
    max_shard_rows: StrictInt | None = None


class _Summary(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    shards: StrictInt | None = None
    bytes: StrictInt | None = None
    layers: dict[str, _Runs] = Field()


def layer_summaries(doc: Any, where: str) -> dict[str, LayerSummary]:
    """Per layer :class:`LayerSummary` from a manifest head's ``summary``; ``ValueError`` for a
    wrong shape (checked, run sizes included, before anything is expanded)."""
    try:
        parsed = _Summary.model_validate(doc)
    except ValidationError:
        raise ValueError(f"{where}: the summary is not {SHAPE}") from None
    layers = parsed.layers
    if any(r[2] <= 0 or r[1] < r[0] for la in layers.values() for r in la.steps):
        raise ValueError(f"{where}: the summary is not {SHAPE} (a step run goes backwards)")
    if any(r0[1] >= r1[0] for la in layers.values() for r0, r1 in zip(la.steps, la.steps[1:])):
        raise ValueError(f"{where}: the summary is not {SHAPE} (step runs out of order)")
    if sum((r[1] - r[0]) // r[2] + 1 for la in layers.values() for r in la.steps) > MAX_STEPS:
        raise ValueError(f"{where}: the summary lists more than {MAX_STEPS} steps")
    return {name: LayerSummary.model_construct(  # (checked above, as _Runs)
                feature_shape=la.feature_shape, dtype=la.dtype, shards=la.shards, rows=la.rows,
                steps=expand(la.steps), dropped_rows=la.dropped_rows,
                provenance_shards=la.provenance_shards, max_shard_rows=la.max_shard_rows)
            for name, la in layers.items()}
