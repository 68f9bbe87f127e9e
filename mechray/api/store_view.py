"""A read-only view of the served store: its manifest parsed once per change, and its catalog.

Usage::

    from mechray.api.store_view import StoreView

    view = StoreView("./mechint_cache", config)
    snap = view.snapshot()          # Snapshot(store, version, layers, total); 404/503 if none
    snap.layers["popt"].rows        # per-layer catalog (LayerSummary), from the manifest's summary
    view.facts("popt")              # LayerFacts from the summary: shards, rows, steps, largest
    view.entry_facts("popt")        # the same from the entries (checked before a run)
    view.layers_json()              # bytes of LayersResponse (cached per version)
    view.shards_json(offset=0, limit=100)   # one page of ShardsResponse
    view.ready()                    # for /health: never parses the manifest

The manifest is read again only when it changed: on local disk when the directory's or the
manifest's (mtime, size, inode) changed, on S3 when the listed manifests' ETags or sizes changed
(listed at most every ``config.api_manifest_ttl_s`` seconds).  The version is the store's own
(:attr:`ShardStore.version`: those stamps, hashed), so any rewrite of the manifest moves it.
Layers and totals come from the per-layer summary at the manifest's head and a page of shards
from the lines of that page, so ``/interpret/layers`` and ``/interpret/shards`` parse no entry
even at 10^6 shards.  An ``/interpret`` request is planned and costed on the summary too
(``facts``: the layer's shards, rows, steps and largest shard; no entry parsed when the head
records the largest shard), and checked on the entries before it runs (``entry_facts``, read
once per version: the entries the run reads anyway).  The summary is a hint: a head that lies
can mis-size a plan, never run one the limits refuse (:meth:`Planner.check_entries` costs it
again on the entries: 422), a layer it lists that no entry holds is a 404 naming the repair, a
page that comes short of the summary's total counts the entries, so ``next_offset`` always
moves forward (or is null), and ``/interpret/layers`` lists at most :data:`MAX_LISTED_STEPS`
steps per layer.  A manifest that fails to read after a good one keeps the good one served
(logged).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

from mechray.api.errors import ApiError
from mechray.config import MechIntConfig
from mechray.storage import manifest as mf
from mechray.storage.entry import LayerSummary, steps_of
from mechray.storage.reader import ShardStore

log = logging.getLogger(__name__)
_SHARD_KEYS = ("file", "step", "rank", "rows", "bytes", "s3_uri")
MAX_LISTED_STEPS = 10_000   # /interpret/layers lists at most this many steps per layer


@dataclass(frozen=True)
class LayerFacts:
    """One layer as its manifest entries (not the summary at the head) have it."""

    shards: int
    rows: int
    steps: int
    largest: int                         # rows of the largest shard


class Snapshot(NamedTuple):
    """The store as of one manifest version."""

    store: ShardStore
    version: str
    layers: dict[str, LayerSummary]
    total: int                           # shards listed


class StoreView:
    """The served store; thread-safe; see the module docstring."""

    def __init__(self, location: str, config: MechIntConfig):
        self.location, self.config = str(location), config
        self.is_s3 = self.location.startswith("s3://")
        self._snap: Optional[Snapshot] = None
        self._stamp: Any = None
        self._listed = 0.0                              # S3: when the manifests were last listed
        self._pages: dict[str, tuple[str, bytes]] = {}
        self._facts: dict[tuple[str, str], LayerFacts] = {}
        self._totals: dict[str, int] = {}               # version -> entries counted
        self._lock = threading.Lock()

    # --- the manifest ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The current :class:`Snapshot`, re-read only when the manifest changed."""
        with self._lock:
            snap = self._snap
            if snap is not None and self.is_s3 and \
                    time.monotonic() - self._listed < self.config.api_manifest_ttl_s:
                return snap
            stamp = self._current_stamp()
            if snap is not None and stamp == self._stamp:
                return snap
            try:
                snap = self._read(snap)
            except FileNotFoundError as exc:
                if self._snap is None:
                    raise ApiError(404, "no_store", str(exc)) from None
                self._kept(exc)
            except Exception as exc:  # S3 unreachable, a damaged manifest: the server's problem
                if self._snap is None:
                    raise _unreadable(self.location, exc) from None
                self._kept(exc)
            assert snap is not None                    # read now, or the previous one kept
            self._stamp = stamp
            self._snap = snap
            return snap

    def _read(self, snap: Optional[Snapshot]) -> Snapshot:
        """Read the manifest's head (opening the store the first time) and catalog a new
        version; the entries stay unparsed until something needs them."""
        if snap is None:
            store = ShardStore(self.location, endpoint_url=self.config.endpoint_url,
                               region=self.config.s3_region)
        else:
            store = snap.store
            store.refresh()
        version = store.version
        if snap is not None and version == snap.version:
            return snap
        return Snapshot(store, version, store.summaries(), store.count())

    def shard_rows(self, layer: str) -> int:
        """Rows of ``layer``'s largest shard (what one task holds in memory)."""
        return self.facts(layer).largest

    def facts(self, layer: str) -> LayerFacts:
        """``layer`` as a request is planned on it, without reading an entry when the summary
        records the largest shard: the summary computed from the entries (a manifest read
        whole), or the manifest head's word (a usable journal head).  A head's figures are a
        hint, taken bounded (negative counts as 0); :meth:`entry_facts` checks them against the
        entries before anything runs.  A layer listed with no shard is a 404 naming the repair."""
        snap = self.snapshot()
        head = snap.layers.get(layer)
        if head is None or head.max_shard_rows is None:     # an older head: count the entries
            return self.entry_facts(layer)
        facts = LayerFacts(max(head.shards, 0), max(head.rows, 0), len(head.steps),
                           max(head.max_shard_rows, 0))
        if facts.shards == 0:
            raise _no_shards(layer)
        return facts

    def entry_facts(self, layer: str) -> LayerFacts:
        """``layer`` as its entries have it (shards, rows, steps, largest shard), counted once
        per version: what a request is checked on before it runs (the run reads those entries
        anyway), never the summary at the head alone.  A layer the summary lists but no entry
        holds is a 404 naming the repair; a summary that disagrees with the entries is logged."""
        snap = self.snapshot()
        key = (snap.version, layer)
        if key not in self._facts:
            largest = shards = total = 0
            steps: set[int] = set()
            for e in snap.store.shards(layer):
                rows = e.get("rows")
                n = rows.get(layer, 0) if isinstance(rows, dict) else 0
                n = n if isinstance(n, int) and n > 0 else 0
                largest, shards, total = max(largest, n), shards + 1, total + n
                listed = e.get("steps", [e.get("step")])
                if isinstance(listed, list):
                    steps.update(s for s in listed if isinstance(s, int))
            facts = LayerFacts(shards, total, len(steps), largest)
            head = snap.layers.get(layer)
            if head is not None and (head.shards, head.rows, len(head.steps)) != \
                    (shards, total, len(steps)):
                log.warning("mechray: the manifest summary of %s lists layer %r with %d shards, "
                            "%d rows, %d steps; its entries hold %d, %d, %d: checking requests "
                            "on the entries (`mechray repair --rebuild` rewrites the summary)",
                            self.location, layer, head.shards, head.rows, len(head.steps),
                            shards, total, len(steps))
            with self._lock:
                self._facts = {k: v for k, v in self._facts.items() if k[0] == snap.version}
                self._facts[key] = facts
        facts = self._facts[key]
        if facts.shards == 0:
            raise _no_shards(layer)
        return facts

    def _kept(self, exc: BaseException) -> None:
        log.warning("mechray: re-reading the manifest of %s failed (%s: %s); serving the "
                    "previous one", self.location, type(exc).__name__, exc)

    def _current_stamp(self) -> Any:
        """What changes when the manifest does (never parses it)."""
        if not self.is_s3:                    # the directory's mtime moves when a per-rank
            root = Path(self.location).expanduser()        # manifest appears or is replaced
            try:
                d = root.stat()
            except OSError:
                return None
            return (d.st_mtime_ns, mf.stamp(root),   # journals append: their stats move
                    tuple(mf.stamp(root, p.name) for p in mf.partial_manifests(root)))
        self._listed = time.monotonic()
        try:
            return tuple(_s3_manifests(self.location, self.config))
        except Exception as exc:  # listing failed: treat as unchanged, say so
            log.warning("mechray: listing the manifests of %s failed (%s)", self.location, exc)
            return self._stamp

    def ready(self) -> bool:
        """Whether the store has a manifest to serve, without parsing it (for ``/health``)."""
        if self._snap is not None:
            return True
        if not self.is_s3:
            root = Path(self.location).expanduser()
            if not root.is_dir():
                return False
            return mf.exists(root) or bool(mf.partial_manifests(root))
        try:
            return bool(_s3_manifests(self.location, self.config))
        except Exception:
            return False

    # --- responses -------------------------------------------------------------------------------
    def layers_json(self, saes: Optional[dict[str, Any]] = None) -> bytes:
        """``LayersResponse`` bytes (cached per version); ``saes``: the served SAEs."""
        snap = self.snapshot()
        hit = self._pages.get("layers")
        if hit is not None and hit[0] == snap.version:
            return hit[1]
        body = json.dumps({"store": snap.store.location, "manifest_version": snap.version,
                           "layers": {n: i.public() for n, i in snap.layers.items()},
                           "saes": saes or {}}).encode()
        self._pages["layers"] = (snap.version, body)
        return body

    def shards_json(self, offset: int = 0, limit: int = 1000) -> bytes:
        """One page of the shard list: ``limit`` entries from ``offset`` (and the total)."""
        snap = self.snapshot()
        total = snap.total
        page = snap.store.shards(offset=offset, limit=limit) if offset < total else []
        end = offset + len(page)
        if len(page) < limit and end < total:         # the summary's total is over the entries
            total = self._entry_total(snap)
        return json.dumps({
            "store": snap.store.location, "manifest_version": snap.version,
            "total": total, "offset": offset, "limit": limit,
            "next_offset": end if page and len(page) == limit and end < total else None,
            "shards": [{k: e.get(k) for k in _SHARD_KEYS} | {"steps": steps_of(e)}
                       for e in page]}).encode()

    def _entry_total(self, snap: Snapshot) -> int:
        """Shards the entries list (parsed once per version), for a summary whose total lies."""
        if snap.version not in self._totals:
            counted = len(snap.store.shards())
            log.warning("mechray: the manifest summary of %s says %d shards; its entries list "
                        "%d (`mechray repair --rebuild` rewrites the summary)", self.location,
                        snap.total, counted)
            self._totals = {snap.version: counted}
        return self._totals[snap.version]


def _no_shards(layer: str) -> ApiError:
    return ApiError(404, "layer_without_shards",
                    f"layer {layer!r} is listed in the store's manifest summary but no shard of "
                    "it holds that layer (a damaged or hand-edited manifest); pick another "
                    "layer, and run `mechray repair --rebuild` on the store to rewrite its "
                    "summary")


def _unreadable(location: str, exc: BaseException) -> ApiError:
    rid = uuid.uuid4().hex[:12]
    log.error("mechray: request %s: the store %s cannot be read: %s: %s", rid, location,
              type(exc).__name__, exc)
    return ApiError(503, "store_unreadable",
                    f"the store cannot be read ({type(exc).__name__}); if its manifest is damaged, "
                    f"run `mechray repair` on the store. Request id {rid} in the server log has "
                    "the details", request_id=rid)


def _s3_manifests(location: str, config: MechIntConfig) -> list[tuple[str, str, int]]:
    """(key, ETag, size) of the manifest objects of an S3 store (one list call)."""
    from mechray.storage import s3

    bucket, prefix = s3.parse_uri(location)
    listed = s3.client(config.endpoint_url, config.s3_region).list_objects_v2(
        Bucket=bucket, Prefix=s3.key_for(prefix, "manifest"))
    return sorted((o["Key"], o.get("ETag", ""), o.get("Size", 0))
                  for o in listed.get("Contents", []))
