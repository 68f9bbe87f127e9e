"""Finished analysis results: metadata and body kept apart, bounded in bytes, computed once.

Usage::

    from mechray.api.result_cache import Result, ResultCache

    cache = ResultCache(max_bytes=256 * 2 ** 20, max_entries=256)
    result, shared = cache.compute_once(key, lambda: Result.of(head, "result", per_layer, 0.12))
    cache.get(key)                      # the Result, or None (a hit moves it to the front)
    result.render(cached=True)          # the response bytes

A :class:`Result` holds the response's metadata (``head``: analysis, layer, params, manifest
version...) as a dict and the per-layer answer (``body``) serialised once as JSON; the response
is assembled from the two with the ``cached`` flag set at render time, so no cached bytes are
ever searched or edited.  The cache keeps the most recently used results within ``max_bytes``
(bodies plus heads) and ``max_entries``; a result larger than ``max_bytes`` is answered but not
kept, and a result whose analysis failed on a layer (an ``"error"`` inside) is never kept.
Identical keys in flight run once: the others wait for the first and get its result.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Result:
    """One analysis answer: ``head`` metadata, the per-layer ``body`` JSON, and its timing."""

    head: dict[str, Any]
    name: str                                    # "result" (a store layer) or "results" (upload)
    body: bytes = field(repr=False)
    seconds: float = 0.0
    cacheable: bool = True                       # False when an analysis failed on a layer

    @classmethod
    def of(cls, head: dict[str, Any], name: str, value: Any, seconds: float) -> "Result":
        """Serialise ``value`` (JSON-safe) once; ``name`` is the field it is answered under."""
        layers = value.values() if name == "results" else [value]
        failed = any(isinstance(v, dict) and "error" in v for v in layers)
        return cls(dict(head), name, json.dumps(value, allow_nan=False).encode(), seconds,
                   not failed)

    @property
    def nbytes(self) -> int:
        return len(self.body) + len(json.dumps(self.head)) + 64

    def render(self, cached: bool) -> bytes:
        """The response: ``{**head, name: body, "seconds": ..., "cached": cached}``."""
        head = json.dumps(self.head)
        opening = head[:-1] + (", " if self.head else "") + json.dumps(self.name) + ": "
        closing = f', "seconds": {json.dumps(self.seconds)}, "cached": {json.dumps(cached)}}}'
        return opening.encode() + self.body + closing.encode()


class ResultCache:
    """LRU of :class:`Result` bounded by bytes and entries, with single-flight computation."""

    def __init__(self, max_bytes: int, max_entries: int):
        self.max_bytes, self.max_entries = int(max_bytes), int(max_entries)
        self._items: OrderedDict[str, Result] = OrderedDict()
        self._bytes = 0
        self._flights: dict[str, Future] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held (bodies and heads)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[Result]:
        with self._lock:
            result = self._items.get(key)
            if result is not None:
                self._items.move_to_end(key)
            return result

    def put(self, key: str, result: Result) -> bool:
        """Keep ``result`` under ``key`` unless it is not cacheable or too big; True if kept."""
        size = result.nbytes
        if not result.cacheable or not self.max_entries or size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = result
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._items) > self.max_entries:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
        return True

    def compute_once(self, key: str, compute: Callable[[], Result]) -> tuple[Result, bool]:
        """``(result, shared)``: computed here (and cached), or the result of an identical
        computation already in flight (``shared=True``)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            return flight.result(), True
        try:
            result = compute()
            self.put(key, result)
            flight.set_result(result)
            return result, False
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
