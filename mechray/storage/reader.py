"""Reading a store: a directory or ``s3://bucket/prefix``, shard by shard, checksums verified.

Usage::

    from mechray import ShardStore

    store = ShardStore("./mechint_cache")            # or "s3://my-bucket/exp001/activations"
    store.layers()          # {'popt': {'feature_shape': [64], 'dtype': 'float32', 'rows': ..., ...}}
    for entry, rows in store.iter_layer("popt"):     # one shard in memory at a time (mmap)
        ...
    payload = store.load("activations_shard_000000_step_0.pt")

    for entry, payload in store.payloads(store.shards("popt")):   # the next shard read ahead
        ...

Every read checks the shard's checksum against the manifest (once per file version per store);
a missing, truncated or altered shard raises an error that names it.  On S3, ``load`` and
``iter_layer`` read a shard straight into memory (parallel ranged GETs of
:data:`PART_BYTES` for big objects, checksum verified on the bytes) unless it is already in the
local cache; ``path`` downloads it once into that cache (``cache_dir``, default
``$MECHRAY_CACHE_DIR`` or ``~/.cache/mechray``) for readers that need a file.  ``payloads``
reads the next shard in a background thread while the caller works on the current one.
Nothing here unpickles code: shards load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import heapq
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterable, Iterator, Optional, Union, cast

from mechray.errors import ShardError
from mechray.storage import manifest_format as mf
from mechray.storage import s3
from mechray.storage.entry import LayerSummary, steps_of
from mechray.storage.manifest_format import MAIN, merge
from mechray.storage.shard import (
    checksum,
    corrupt_error,
    decode,
    file_checksum,
    load_error,
    shard_path,
)
from mechray.storage.summary import Summary, runs

if TYPE_CHECKING:
    import torch
else:  # torch loads at first use: `mechray ls` lists a store without it
    from mechray.storage.lazy import torch

log = logging.getLogger(__name__)
PART_BYTES = 32 << 20     # S3 objects above this (the default shard target size) come as parallel
                          # ranged GETs of this size; smaller ones in one GET
PARALLEL_GETS = 4         # ranged GETs in flight per object



def cache_root(base: Path, bucket: str, prefix: str) -> Path:
    """The local cache directory of ``s3://bucket/prefix``: one plain directory per bucket and
    per prefix under ``base/s3``, whatever characters the prefix holds (``..`` included)."""
    from urllib.parse import quote

    parts = [quote(bucket, safe=""), quote(prefix, safe="") if prefix else "_root"]
    parts = [f"_{p}" if p in (".", "..") or not p else p for p in parts]
    root = base / "s3" / parts[0] / parts[1]
    if not root.resolve().is_relative_to((base / "s3").resolve()):
        raise ValueError(f"s3://{bucket}/{prefix} maps outside the cache {base}: refused")
    return root


class ShardStore:
    """A read-only view of one store's manifest and shards."""

    def __init__(self, location: Union[str, os.PathLike], *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, cache_dir: Optional[str] = None):
        self.location = str(location)
        self.endpoint_url, self.region = endpoint_url, region
        self.is_s3 = self.location.startswith("s3://")
        if self.is_s3:
            self.bucket, self.prefix = s3.parse_uri(self.location)
            base = cache_dir or os.environ.get("MECHRAY_CACHE_DIR") or \
                Path.home() / ".cache" / "mechray"
            self.cache_dir: Optional[Path] = Path(base)
            self.root = cache_root(self.cache_dir, self.bucket, self.prefix)
        else:
            self.cache_dir = None
            self.root = Path(self.location).expanduser().resolve()
        self._verified: dict[str, tuple] = {}
        self._load_lock = threading.RLock()
        self._stamp: tuple = ()
        self._doc: Optional[dict[str, Any]] = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._head: Optional[mf.Head] = None
        self._summaries: Optional[dict[str, LayerSummary]] = None
        self._config: dict[str, Any] = {}
        self._total: Optional[int] = None
        self._lines: Optional[tuple] = None     # (stamp, entry line starts) for paging
        self._bytes: Optional[int] = None
        self._sources_now: list = []
        self.refresh()

    # --- the manifest --------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the manifest (and any per-rank partial manifests) if it changed since the last
        read (size, mtime and inode of it and its journal on disk; ETags on S3); returns
        whether it changed.

        Only the head (config and per-layer summary, from the journal's last commit) is read
        here when the store has one; the entries are parsed on first use (``shards()``,
        ``load()``...), once per change.
        """
        sources = self._sources()
        if not sources:
            raise FileNotFoundError(
                f"{self.location} holds no {MAIN}: nothing was captured there yet, or the path is "
                f"wrong. Shards land in MechIntConfig.storage_path (default ./mechint_cache)")
        stamp = tuple((where, st) for where, st, _ in sources)
        if stamp == self._stamp:
            return False
        with self._load_lock:
            single = not self.is_s3 and len(sources) == 1 and \
                sources[0][0] == str(self.root / MAIN)
            head = mf.read_head(self.root) if single else None
            if head is not None:
                self._doc, self._head, self._summaries = None, head, head.layers
                self._total, self._bytes, self._config = head.shards, head.bytes, head.config
            else:
                self._set_doc(merge([read() for _, _, read in sources]))
            self._sources_now, self._stamp = sources, stamp
        return True

    def _set_doc(self, doc: dict[str, Any]) -> None:
        self._doc = doc
        self._entries = {e["file"]: e for e in doc["shards"]}
        self._config = doc.get("config", {})
        self._head = self._summaries = None
        self._total = len(doc["shards"])
        self._bytes = sum(e["bytes"] for e in doc["shards"])

    @property
    def version(self) -> str:
        """Changes whenever a manifest file changes (its size, mtime and inode; ETag on S3):
        a cache key that costs one ``refresh()``, no parse."""
        import hashlib

        return hashlib.sha1(repr(self._stamp).encode()).hexdigest()[:16]

    @property
    def manifest(self) -> dict[str, Any]:
        """The whole manifest (entries parsed and validated on first use after a change)."""
        if self._doc is None:
            with self._load_lock:
                if self._doc is None:
                    self._set_doc(merge([read() for _, _, read in self._sources_now]))
        assert self._doc is not None
        return self._doc

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        _ = self.manifest  # parses the entries on first use
        return self._entries

    def _sources(self) -> list[tuple[str, Any, Any]]:
        """``(where, stamp, read)`` per manifest, the main manifest first; ``read()`` gives
        its document (the journal replayed), through :mod:`mechray.storage.manifest`."""
        if not self.is_s3:
            if not self.root.is_dir():
                return []
            names = [MAIN] + [p.name for p in mf.partial_manifests(self.root)]
            return [(str(self.root / n), st, lambda n=n: mf.load(self.root, n))
                    for n in names if (st := mf.stamp(self.root, n)) is not None]
        client = self._client()
        listed = client.list_objects_v2(Bucket=self.bucket, Prefix=s3.key_for(self.prefix, "manifest"))
        objs = {o["Key"]: o for o in listed.get("Contents", [])}
        main = s3.key_for(self.prefix, MAIN)
        folder = main.rsplit("/", 1)[0] if "/" in main else ""
        keys = [k for k in objs if k == main] + \
            sorted(k for k in objs if mf.is_partial(k.rsplit("/", 1)[-1]) and
                   (k.rsplit("/", 1)[0] if "/" in k else "") == folder)

        def get(key: str) -> Optional[bytes]:
            if key not in objs:
                return None
            try:
                return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:   # a journal folded away since the listing
                return None

        def journal(key: str) -> str:
            return key[: len(key) - len(key.rsplit("/", 1)[-1])] + \
                mf.journal_name(key.rsplit("/", 1)[-1])

        def stamp_of(key: str) -> tuple:
            return tuple((objs[k].get("ETag"), objs[k].get("Size")) if k in objs else None
                         for k in (key, journal(key)))
        return [(f"s3://{self.bucket}/{k}", stamp_of(k),
                 lambda k=k: mf.combine(get(k), get(journal(k)), f"s3://{self.bucket}/{k}"))
                for k in keys]

    def _client(self):
        return s3.client(self.endpoint_url, self.region)

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    def shards(self, layer: Optional[str] = None, offset: int = 0,
               limit: Optional[int] = None) -> list[dict[str, Any]]:
        """Manifest entries (all, or those holding ``layer``), by rank then index; ``offset`` and
        ``limit`` page through them (``count()`` gives the total)."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset={offset} and limit={limit} must be >= 0")
        if layer is None and limit is not None and self._doc is None:
            page = self._page(offset, limit)  # one entry per line: read only the page's lines
            if page is not None:
                return page
        picked = self.manifest["shards"] if layer is None else \
            [e for e in self.manifest["shards"] if layer in e["layers"]]
        return picked[offset: None if limit is None else offset + limit]

    def _page(self, offset: int, limit: int) -> Optional[list[dict[str, Any]]]:
        """Entries ``offset..offset+limit`` of a local manifest whose journal holds no entries,
        through an index of manifest.json's entry lines built once per change (None: read it
        all instead)."""
        head = self._head
        if head is None or head.records:
            return None
        with self._load_lock:
            if self._lines is None or self._lines[0] != self._stamp:
                starts = mf.entry_starts(self.root, head)
                if len(starts) - 1 != self._total:
                    return None
                self._lines = (self._stamp, starts)
            starts = self._lines[1]
        return mf.entries_at(self.root, starts, offset, offset + limit)

    def count(self, layer: Optional[str] = None) -> int:
        """How many shards the manifest lists (holding ``layer``); from the summary if it has one."""
        if layer is None and isinstance(self._total, int):
            return self._total
        if self._summaries is not None:
            return self._summaries[layer].shards if layer in self._summaries else 0
        return len(self.shards(layer))

    def total_bytes(self) -> int:
        """Bytes of every listed shard (from the summary when the manifest has one)."""
        return self._bytes if isinstance(self._bytes, int) else \
            sum(e["bytes"] for e in self.manifest["shards"])

    def summaries(self) -> dict[str, LayerSummary]:
        """Per layer :class:`LayerSummary` (from the manifest's head when it has one: no entry
        is parsed)."""
        if self._summaries is None:
            self._summaries = Summary(self.manifest["shards"]).summaries()
        return self._summaries

    def layers(self) -> dict[str, dict[str, Any]]:
        """Per layer: feature shape, dtype, shard count, total rows, steps, rows dropped by the
        ``max_activations_per_shard`` cap, and how many shards carry token provenance, as plain
        dicts (:meth:`summaries` gives them typed)."""
        return {k: v.info() for k, v in self.summaries().items()}

    def step_runs(self) -> list[list[int]]:
        """Every captured step as ``[first, last, stride]`` runs, without listing each step when
        the summary's layers agree (a million-shard store answers at once)."""
        head = [la["steps"] for la in self._head.summary["layers"].values()] \
            if self._head is not None and self._doc is None else []
        if head and all(r == head[0] for r in head):
            return head[0]
        return runs(heapq.merge(*(info.steps for info in self.summaries().values())))

    def steps(self) -> list[int]:
        return sorted({s for info in self.summaries().values() for s in info.steps})

    def check_layer(self, layer: str) -> None:
        """Raise ``KeyError`` naming the valid layers when ``layer`` was not captured here."""
        known = self.layers()
        if layer not in known:
            import difflib

            close = difflib.get_close_matches(layer, list(known), n=3)
            raise KeyError(f"layer {layer!r} is not in {self.location}"
                           f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                           f"captured layers: {sorted(known)}")

    # --- shards --------------------------------------------------------------------------------
    def path(self, shard: Union[str, dict[str, Any]]) -> Path:
        """A verified local path for a shard (downloaded into the cache when it lives on S3)."""
        entry = self._entry(shard)
        local = shard_path(self.root, entry["file"])
        if not local.is_file() and not self.is_s3:
            spool = shard_path(self.root / ".spool", entry["file"])
            local = spool if spool.is_file() else local
        if not local.is_file():
            if not entry.get("s3_uri") and not self.is_s3:
                raise ShardError(f"shard {entry['file']} is listed in the manifest but missing "
                                 f"from {self.root}; restore it, or run `mechray ls` to see what "
                                 f"is there")
            self._download(entry, local)
        self._verify(entry, local)
        return local

    def load(self, shard: Union[str, dict[str, Any]], mmap: bool = True) -> dict[str, Any]:
        """The shard's payload (``activations``, ``metadata``, maybe ``inputs``): memory-mapped
        from a local file, or read into memory from S3 when it is not in the local cache."""
        entry = self._entry(shard)
        if self.is_s3 and not self._cached(entry):
            data = self.read_bytes(entry)
            try:
                return decode(cast(bytes, data))       # bytes or a bytearray: both read
            except Exception as exc:
                raise ShardError(f"shard {entry['file']} (s3://{self._object(entry)[0]}/"
                                 f"{self._object(entry)[1]}) could not be loaded: "
                                 f"{load_error(exc)}") from None
        path = self.path(entry)
        try:
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
        except Exception as exc:  # a verified file that still fails to load is a format problem
            raise ShardError(f"shard {entry['file']} ({path}) could not be loaded: "
                             f"{load_error(exc)}") from None

    def payloads(self, shards: Iterable[Union[str, dict[str, Any]]], ahead: int = 1
                 ) -> Generator[tuple[dict[str, Any], dict[str, Any]], None, None]:
        """Yield ``(entry, payload)`` per shard, in order, with the next ``ahead`` shards read
        (downloaded, verified, loaded) in a background thread meanwhile.  A shard that fails
        raises its :class:`ShardError` at its turn; stopping early (``break``, an error) cancels
        what was read ahead and ends the thread."""
        entries = [self._entry(s) for s in shards]
        if ahead <= 0 or len(entries) < 2:
            for entry in entries:
                yield entry, self.load(entry)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechray-read-ahead")
        pending: list[tuple[dict[str, Any], Future]] = []
        try:
            nxt = 0
            for _ in range(len(entries)):
                while nxt < len(entries) and len(pending) <= ahead:
                    pending.append((entries[nxt], pool.submit(self.load, entries[nxt])))
                    nxt += 1
                entry, fut = pending.pop(0)
                payload = fut.result()
                yield entry, payload
                del payload, fut
        finally:
            for _, fut in pending:
                fut.cancel()
            pending.clear()
            pool.shutdown(wait=True)

    def iter_layer(self, layer: str, steps: Optional[list[int]] = None
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Yield ``(entry, rows)`` per shard holding ``layer``; only that shard is mapped."""
        self.check_layer(layer)
        picked = [e for e in self.shards(layer) if steps is None or
                  set(steps_of(e)) & set(steps)]
        for entry, payload in self.payloads(picked):
            yield entry, payload["activations"][layer]

    def read_layer(self, layer: str, max_rows: Optional[int] = None) -> torch.Tensor:
        """All (or the first ``max_rows``) rows of a layer as one tensor; for small stores."""
        parts, total = [], 0
        for _, rows in self.iter_layer(layer):
            parts.append(rows[: None if max_rows is None else max_rows - total].clone())
            total += len(parts[-1])
            if max_rows is not None and total >= max_rows:
                break
        return torch.cat(parts)

    def _entry(self, shard: Union[str, dict[str, Any]]) -> dict[str, Any]:
        if isinstance(shard, dict):
            return shard
        name = os.path.basename(str(shard))
        if name not in self.entries:
            raise ShardError(f"shard {name!r} is not listed in the manifest of {self.location}; "
                             f"`mechray ls {self.location}` lists the shards")
        return self.entries[name]

    def _object(self, entry: dict[str, Any]) -> tuple[str, str]:
        """The ``(bucket, key)`` of a shard on S3 (refusing a key with another file name)."""
        bucket, key = s3.parse_uri(entry["s3_uri"]) if entry.get("s3_uri") else \
            (self.bucket, s3.key_for(self.prefix, entry["file"]))
        if key.rsplit("/", 1)[-1] != entry["file"]:
            raise ShardError(f"the manifest of {self.location} gives shard {entry['file']} the "
                             f"S3 object {key!r}, which has another name: refused")
        return bucket, key

    def _cached(self, entry: dict[str, Any]) -> bool:
        try:
            return shard_path(self.root, entry["file"]).is_file()
        except ShardError:
            return False

    def read_bytes(self, shard: Union[str, dict[str, Any]]) -> bytes | bytearray:
        """A shard's bytes straight from S3 into memory, checked against the manifest's size
        and checksum (objects over :data:`PART_BYTES`: parallel ranged GETs)."""
        entry = self._entry(shard)
        bucket, key = self._object(entry)
        size = int(entry["bytes"])
        try:
            data = s3.get_bytes(self._client(), bucket, key, size, PART_BYTES, PARALLEL_GETS)
        except Exception as exc:
            raise ShardError(f"shard {entry['file']} could not be read from "
                             f"s3://{bucket}/{key}: {exc}") from exc
        if len(data) != size:
            raise ShardError(f"shard {entry['file']} (s3://{bucket}/{key}) is {len(data)} bytes "
                             f"but the manifest says {size}: it is truncated or was replaced")
        if checksum(memoryview(data), entry["checksum"]) != entry["checksum"]:  # its algorithm
            raise corrupt_error(entry, f"s3://{bucket}/{key}", self.location)
        return data

    def _download(self, entry: dict[str, Any], local: Path) -> None:
        bucket, key = self._object(entry)
        local.parent.mkdir(parents=True, exist_ok=True)
        if local.parent.resolve() != self.root.resolve():  # contained, after resolving links
            raise ShardError(f"shard {entry['file']} would be downloaded to {local.parent}, "
                             f"outside the cache {self.root}: refused")
        fd, name = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
        os.close(fd)
        tmp = Path(name)  # unique: concurrent readers of one shard never share a temp file
        try:
            self._client().download_file(bucket, key, str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise ShardError(f"shard {entry['file']} could not be downloaded from "
                             f"s3://{bucket}/{key}: {exc}") from exc
        os.replace(tmp, local)

    def _verify(self, entry: dict[str, Any], path: Path) -> None:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, entry["checksum"])
        if self._verified.get(str(path)) == stamp:
            return
        if st.st_size != entry["bytes"]:
            raise ShardError(f"shard {entry['file']} ({path}) is {st.st_size} bytes but the "
                             f"manifest says {entry['bytes']}: it is truncated or was replaced")
        if file_checksum(path, entry["checksum"]) != entry["checksum"]:
            raise corrupt_error(entry, path, self.location)
        self._verified[str(path)] = stamp
