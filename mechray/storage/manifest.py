"""``manifest.json``: the index of every durable shard, kept by exactly one owner.

Usage::

    from mechray.storage.manifest import Manifest

    owner = Manifest(target, config.to_dict())     # loads what is already there
    owner.add(entry)                                # rewrites manifest.json atomically (+ upload)
    owner.next_index(rank=0)                        # first shard index not used yet on this rank

One owner per store: the in-process writer, or one named Ray actor shared by every rank and
node.  When ranks of a ``torch.distributed`` job write without Ray, each rank owns
``manifest.rank{r:03d}.json`` and rank 0 merges them into ``manifest.json`` at the end
(:func:`merge_rank_manifests`); readers merge whatever partial manifests remain.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from mechray.storage import s3
from mechray.storage.shard import parse_shard_name, temp_target
from mechray.storage.sink import ShardSink, StorageTarget, atomic_write, orphans, upload

log = logging.getLogger(__name__)

FORMAT = "mechray.manifest"
VERSION = 1
MAIN = "manifest.json"
_PARTIAL = re.compile(r"^manifest\.rank(\d{3,})\.json$")


def partial_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def empty(config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"format": FORMAT, "version": VERSION, "created": now, "updated": now,
            "config": config or {}, "shards": []}


def validate(doc: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest's shape; raise ``ValueError`` naming ``where`` and the problem."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{where} is not a mechray manifest (format field missing or wrong)")
    if doc.get("version") != VERSION:
        raise ValueError(f"{where} has manifest version {doc.get('version')!r}; this mechray "
                         f"reads version {VERSION}: upgrade mechray")
    shards = doc.get("shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and "file" in e and
                                               "checksum" in e for e in shards):
        raise ValueError(f"{where}: 'shards' must be a list of entries with 'file' and 'checksum'")
    return doc


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of manifests keyed by file name (later documents win), sorted by rank then index."""
    if not docs:
        return empty()
    out = dict(docs[0])
    by_file: dict[str, dict] = {}
    for doc in docs:
        for entry in doc["shards"]:
            by_file[entry["file"]] = entry
        if doc.get("config"):
            out["config"] = doc["config"]
    out["shards"] = sorted(by_file.values(), key=lambda e: (e.get("rank", 0), e.get("index", 0)))
    return out


class Manifest:
    """The owner of one manifest file: thread-safe adds, atomic rewrites, upload to S3."""

    def __init__(self, target: StorageTarget, config: Optional[dict[str, Any]] = None,
                 filename: str = MAIN):
        self.target, self.filename = target, filename
        self.path = Path(target.local_dir) / filename
        self._cond = threading.Condition()
        doc = empty(config)
        if self.path.exists():
            doc = validate(json.loads(self.path.read_text()), str(self.path))
            if config:
                doc["config"] = config
        self.doc = {k: v for k, v in doc.items() if k != "shards"}
        self._by_file = {e["file"]: e for e in doc["shards"]}
        self._lines = {f: json.dumps(e, allow_nan=False) for f, e in self._by_file.items()}
        self.upload_pending = False
        self._version = self._durable = 0
        self._writing = False

    def add(self, *entries: dict[str, Any]) -> int:
        """Record durable shards (idempotent per file name); returns how many shards are listed.

        Returns once a manifest listing them is durable.  Concurrent callers share rewrites
        (group commit): while one rewrite runs, later adds wait and the next rewrite covers them
        all, so a busy store costs one rewrite per batch rather than one per shard.
        """
        with self._cond:
            for entry in entries:
                self._by_file[entry["file"]] = entry
                self._lines[entry["file"]] = json.dumps(entry, allow_nan=False)
            return self._commit()

    def remove(self, *files: str) -> None:
        """Forget entries (used by ``mechray repair`` for files that are gone or corrupt)."""
        with self._cond:
            for f in files:
                self._by_file.pop(f, None)
                self._lines.pop(f, None)
            self._commit()

    def _commit(self) -> int:
        """With ``_cond`` held: make the current state durable (or wait for a rewrite that does)."""
        self._version += 1
        mine = self._version
        while self._durable < mine:
            if self._writing:
                self._cond.wait()
                continue
            self._writing, version, text = True, self._version, self._render()
            self._cond.release()
            try:
                self._persist(text)
            finally:
                self._cond.acquire()
                self._writing = False
                self._cond.notify_all()
            self._durable = max(self._durable, version)
        return len(self._by_file)

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

    def _render(self) -> str:
        """The manifest as JSON text: one shard entry per line (readable, and fast to encode)."""
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        head = json.dumps(self.doc, indent=1)
        order = sorted(self._by_file, key=lambda f: (self._by_file[f].get("rank", 0),
                                                     self._by_file[f]["index"]))
        shards = ",\n  ".join(self._lines[f] for f in order)
        return f'{head[:-2]},\n "shards": [\n  {shards}\n ]\n}}\n' if order else \
            f'{head[:-2]},\n "shards": []\n}}\n'

    def _persist(self, text: str) -> None:
        atomic_write(self.path, text.encode())
        if self.target.uses_s3:
            try:  # one quick try while an outage is known, full backoff otherwise
                upload(self.target, self.path, self.filename,
                       0.0 if self.upload_pending else min(5.0, self.target.retry_seconds))
                self.upload_pending = False
            except Exception as exc:
                if not s3.transient(exc):
                    raise
                self.upload_pending = True
                log.warning("manifest upload deferred (S3 unavailable: %s); the local %s is "
                            "current and is uploaded with the next shard or `mechray sync`",
                            exc, self.path)

    def pending(self) -> list[dict[str, Any]]:
        """Entries of shards that are durable locally but not uploaded yet."""
        return [e for e in self.entries() if e.get("pending_upload")]

    def sync_pending(self, budget_s: Optional[float] = None) -> tuple[int, int]:
        """Upload every pending shard (and the manifest); returns ``(uploaded, still_pending)``."""
        sink = ShardSink(self.target)
        uploaded = 0
        for entry in self.pending():
            entry = dict(entry)
            if sink.upload(entry, self.target.shard_dir / entry["file"], budget_s):
                uploaded += 1
            self.add(entry)
        with self._cond:
            self._commit()  # uploads the manifest too (it may be all that was pending)
        return uploaded, len(self.pending())


def merge_rank_manifests(target: StorageTarget, config: Optional[dict[str, Any]] = None) -> int:
    """Fold every ``manifest.rank*.json`` into ``manifest.json`` (rank 0, after a barrier).

    Returns the number of shards listed.  Partial files are removed once the merged manifest is
    durable (and uploaded), so nothing is listed only in a file that is gone.
    """
    root = Path(target.local_dir)
    partials = sorted(p for p in root.glob("manifest.rank*.json") if _PARTIAL.match(p.name))
    owner = Manifest(target, config)
    docs = [validate(json.loads(p.read_text()), str(p)) for p in partials]
    count = owner.add(*[e for d in docs for e in d["shards"]])
    for p in partials:
        p.unlink(missing_ok=True)
        if target.uses_s3:
            target.client().delete_object(Bucket=target.bucket, Key=s3.key_for(target.prefix, p.name))
    log.info("merged %d rank manifests into %s (%d shards)", len(partials), owner.path, count)
    return count
