"""The owner of a store's manifest: holds its entries, commits them (group commit), compacts.

Usage::

    from mechray.storage.manifest import Manifest

    owner = Manifest(target, config.to_dict())     # loads what is already there
    owner.add(entry)                                # durable (and uploaded) when it returns
    owner.next_index(rank=0)                        # first shard index not used yet on this rank
    owner.close()                                   # folds the journal into manifest.json

One owner per store: the in-process writer, or one named Ray actor shared by every rank and
node.  When ranks of a ``torch.distributed`` job write without Ray, each rank owns
``manifest.rank{r:03d}.json`` (+ ``.journal``) and rank 0 merges them into ``manifest.json`` at
the end (:func:`merge_rank_manifests`).  The files' format, and reading them, is
:mod:`mechray.storage.manifest_format`; its names are also importable from here
(``from mechray.storage.manifest import ManifestError, MAIN, load, merge, read_head``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mechray.storage import s3
from mechray.storage.files import atomic_write
from mechray.storage.manifest_format import (
    FORMAT,
    JOURNAL,
    MAIN,
    READS,
    TAIL,
    TAIL_SCAN,
    VERSION,
    Head,
    Journal,
    ManifestError,
    binding,
    combine,
    empty,
    entries_at,
    entry_order,
    entry_starts,
    exists,
    is_partial,
    journal_name,
    journal_start,
    load,
    merge,
    parse,
    parse_journal,
    partial_manifests,
    partial_name,
    read,
    read_bytes,
    read_head,
    rebuild_hint,
    record_line,
    render,
    replay,
    stamp,
    utc_now,
    validate,
    write_new,
)
from mechray.storage.shard import parse_shard_name, shard_path, temp_target
from mechray.storage.sink import ShardSink, orphans, upload
from mechray.storage.summary import Summary
from mechray.storage.target import StorageTarget

__all__ = [  # the owner, and the format's names re-exported where they were always imported
    "COMPACT_BELOW", "S3_JOURNAL_MAX", "Manifest", "merge_rank_manifests",
    "FORMAT", "JOURNAL", "MAIN", "READS", "TAIL", "TAIL_SCAN", "VERSION", "Head", "Journal",
    "ManifestError", "binding", "combine", "empty", "entries_at", "entry_starts", "exists",
    "is_partial", "journal_name", "journal_start", "load", "merge", "parse", "parse_journal",
    "partial_manifests", "partial_name", "read", "read_head", "rebuild_hint", "render", "replay",
    "stamp", "utc_now", "validate", "write_new",
]

log = logging.getLogger(__name__)

COMPACT_BELOW = 4 << 20        # a store whose manifest is smaller is rewritten at every commit
S3_JOURNAL_MAX = 4 << 20       # on S3 (no append) the journal is uploaded whole: kept this small


@dataclass
class _Work:
    """One commit's I/O, planned under the owner's lock and done outside it."""

    compact: bool
    data: bytes
    journal: bytes = b""


class Manifest:
    """The owner of one manifest (and its journal): thread-safe adds, group commits that append,
    compaction, upload to S3.

    ``before_commit`` (optional) is called before every commit's I/O, outside the lock; raising
    there stops the commit (the claim's fencing check goes here).
    """

    def __init__(self, target: StorageTarget, config: Optional[dict[str, Any]] = None,
                 filename: str = MAIN, before_commit: Optional[Callable[[], None]] = None):
        self.target, self.filename = target, filename
        root = Path(target.local_dir)
        self.path, self.journal_path = root / filename, root / journal_name(filename)
        self.before_commit = before_commit
        self._cond = threading.Condition()
        doc, self._journal_ok, self._journal_bytes = self._load(config)
        self.doc = {k: v for k, v in doc.items() if k not in ("shards", "summary")}
        self.doc["version"] = VERSION
        self._by_file = {e["file"]: e for e in doc["shards"]}
        self._summary = Summary(self._by_file.values())
        self._changed: dict[str, Optional[dict[str, Any]]] = {}
        self.upload_pending = False
        self._remote_main_stale = False
        self._s3_journal = target.uses_s3     # unknown: the first compaction deletes it
        self._version = self._durable = 0
        self._writing = self._closing = False

    def _load(self, config: Optional[dict[str, Any]]) -> tuple[dict[str, Any], bool, int]:
        """The state on disk; whether the journal can be appended to as it is; its length."""
        self._main_bytes: int = 0
        self._records: int = 0
        if not os.path.lexists(self.path):
            return empty(config), False, 0
        main = read_bytes(self.path, "manifest")
        doc = parse(main, str(self.path))
        self._main_bytes = len(main)
        jdata = read_bytes(self.journal_path, "manifest journal") \
            if os.path.lexists(self.journal_path) else None
        doc, j = replay(doc, main, jdata, str(self.path))
        usable = False
        if j is not None and jdata is not None:
            self._records = len(j.records)
            usable = doc.get("version") == VERSION and j.committed == len(jdata) and \
                (not config or j.header.get("config") == config)
        if config:
            doc["config"] = config
        return doc, usable, len(jdata or b"")

    # --- changes -------------------------------------------------------------------------------
    def add(self, *entries: dict[str, Any]) -> int:
        """Record durable shards (idempotent per file name); returns how many shards are listed.

        Returns once a manifest listing them is durable.  Concurrent callers share commits
        (group commit): while one commit's I/O runs, later adds wait and the next commit covers
        them all; a commit appends their entries to the journal (O(new entries)).
        """
        with self._cond:
            for entry in entries:
                old = self._by_file.get(entry["file"])
                if old is not None:
                    self._summary.remove(old)
                self._summary.add(entry)
                self._by_file[entry["file"]] = entry
                self._changed[entry["file"]] = entry
            return self._commit()

    def remove(self, *files: str) -> None:
        """Forget entries (used by ``mechray repair`` for files that are gone or corrupt)."""
        with self._cond:
            for f in files:
                old = self._by_file.pop(f, None)
                if old is not None:
                    self._summary.remove(old)
                    self._changed[f] = None
            self._commit()

    def close(self) -> None:
        """Fold the journal into ``manifest.json`` (a readable index of every shard again)."""
        with self._cond:
            if self._journal_ok and not self._records and not self._changed:
                return
            self._closing = True
            try:
                self._commit()
            finally:
                self._closing = False

    def _commit(self) -> int:
        """With ``_cond`` held: make the current state durable (or wait for a commit that does)."""
        self._version += 1
        mine = self._version
        while self._durable < mine:
            if self._writing:
                self._cond.wait()
                continue
            self._writing, version, work = True, self._version, self._plan()
            self._cond.release()
            done = False
            try:
                self._persist(work)
                done = True
            finally:
                self._cond.acquire()
                self._writing = False
                if not done:       # the next commit rewrites the whole state
                    self._journal_ok = False
                self._cond.notify_all()
            self._durable = max(self._durable, version)
        return len(self._by_file)

    def _compact_due(self) -> bool:
        if not self._journal_ok or self._closing:
            return True
        if self._main_bytes + self._journal_bytes < COMPACT_BELOW:
            return True
        limit = S3_JOURNAL_MAX if self.target.uses_s3 else self._main_bytes // 4
        return self._journal_bytes > limit

    def _plan(self) -> _Work:
        """With ``_cond`` held: this commit's bytes (a journal append, or a whole rewrite)."""
        changed, self._changed = self._changed, {}
        summary = self._summary.to_json()
        if self._compact_due():
            self.doc["updated"] = utc_now()
            order = sorted(self._by_file, key=lambda f: entry_order(self._by_file[f]))
            data, span = render({**self.doc, "summary": summary},
                                [json.dumps(self._by_file[f], allow_nan=False) for f in order])
            self._records, self._journal_ok = 0, True
            self._main_bytes = len(data)
            journal = journal_start(data, span, self.doc.get("config", {}), summary)
            self._journal_bytes = len(journal)
            return _Work(True, data, journal)
        lines = [record_line({"add": e}) if e is not None else record_line({"remove": f})
                 for f, e in changed.items()]
        self._records += len(lines)
        lines.append(record_line({"commit": {"updated": utc_now(), "records": self._records,
                                       "summary": summary}}))
        data = ("\n".join(lines) + "\n").encode()
        self._journal_bytes += len(data)
        return _Work(False, data)

    def _persist(self, work: _Work) -> None:
        if self.before_commit is not None:
            self.before_commit()
        if work.compact:
            atomic_write(self.path, work.data)
            atomic_write(self.journal_path, work.journal)
        else:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND |
                         getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                view = memoryview(work.data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.target.uses_s3:
            self._upload(work.compact)

    def _upload(self, compact: bool) -> None:
        """The remote copy: ``manifest.json`` after a compaction (and the remote journal goes),
        else the journal, uploaded whole (S3 cannot append; it stays under S3_JOURNAL_MAX)."""
        try:  # one quick try while an outage is known, full backoff otherwise
            budget = 0.0 if self.upload_pending else min(5.0, self.target.retry_seconds)
            if compact or self._remote_main_stale:
                upload(self.target, self.path, self.filename, budget)
                self._remote_main_stale = False
                if self._s3_journal:
                    self.target.client().delete_object(
                        Bucket=self.target.bucket,
                        Key=s3.key_for(self.target.prefix, self.journal_path.name))
                    self._s3_journal = False
            if not compact:
                upload(self.target, self.journal_path, self.journal_path.name, budget)
                self._s3_journal = True
            self.upload_pending = False
        except Exception as exc:
            if not s3.transient(exc):
                raise
            self.upload_pending = True
            self._remote_main_stale = self._remote_main_stale or compact
            log.warning("manifest upload deferred (S3 unavailable: %s); the local %s is "
                        "current and is uploaded with the next shard or `mechray sync`",
                        exc, self.path)

    # --- queries -------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._by_file.values())

    def next_index(self, rank: int) -> int:
        """One past the highest shard index this rank has in the manifest or on disk."""
        listed = self.entries()
        used = [e["index"] for e in listed if e.get("rank", 0) == rank]
        strays = []  # this rank's files the manifest does not list (other ranks list their own)
        for p in orphans(self.target, {e["file"] for e in listed}):
            parsed = parse_shard_name(temp_target(p.name) or p.name)
            if parsed and parsed["rank"] == rank:
                used.append(parsed["index"])
                strays.append(p)
        if strays:
            log.warning("%d file(s) in %s are not in the manifest (an interrupted run?); new "
                        "shards are numbered after them. `mechray repair %s` adopts the "
                        "complete ones", len(strays), self.target.shard_dir, self.target.local_dir)
        return max(used, default=-1) + 1

    def pending(self) -> list[dict[str, Any]]:
        """Entries of shards that are durable locally but not uploaded yet."""
        return [e for e in self.entries() if e.get("pending_upload")]

    def sync_pending(self, budget_s: Optional[float] = None) -> tuple[int, int]:
        """Upload every pending shard, then the manifest (folded: S3 then holds one
        ``manifest.json``); returns ``(uploaded, still_pending)``."""
        sink = ShardSink(self.target)
        uploaded = 0
        budget = self.target.retry_seconds if budget_s is None else budget_s
        deadline = time.monotonic() + budget  # one budget for all, not one per shard
        pending = self.pending()
        if pending:
            log.info("uploading %d pending shard(s) to s3://%s/%s (up to %.0fs)", len(pending),
                     self.target.bucket, self.target.prefix, budget)
        for entry in pending:
            entry = dict(entry)
            left = max(0.0, deadline - time.monotonic())
            if sink.upload(entry, shard_path(self.target.shard_dir, entry["file"]), left):
                uploaded += 1
            else:
                deadline = 0.0  # still down: the rest get one quick try each
            self.add(entry)
        with self._cond:
            self._closing = True
            try:
                self._commit()  # uploads the manifest too (it may be all that was pending)
            finally:
                self._closing = False
        return uploaded, len(self.pending())


def merge_rank_manifests(target: StorageTarget, config: Optional[dict[str, Any]] = None) -> int:
    """Fold every ``manifest.rank*.json`` (and its journal) into ``manifest.json`` (rank 0,
    after a barrier).

    Returns the number of shards listed.  Partial files are removed once the merged manifest is
    durable (and uploaded), so nothing is listed only in a file that is gone.
    """
    root = Path(target.local_dir)
    partials = partial_manifests(root)
    owner = Manifest(target, config)
    docs = [load(root, p.name) for p in partials]
    count = owner.add(*[e for d in docs for e in d["shards"]])
    owner.close()
    for p in partials:
        for name in (p.name, journal_name(p.name)):
            (root / name).unlink(missing_ok=True)
            if target.uses_s3:
                target.client().delete_object(Bucket=target.bucket,
                                              Key=s3.key_for(target.prefix, name))
    log.info("merged %d rank manifests into %s (%d shards)", len(partials), owner.path, count)
    return count
