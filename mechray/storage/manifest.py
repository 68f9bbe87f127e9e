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

from mechray.errors import ShardError
from mechray.storage import s3
from mechray.storage.shard import DIGEST, parse_shard_name, shard_path, temp_target
from mechray.storage.sink import ShardSink, StorageTarget, atomic_write, orphans, upload
from mechray.storage.summary import Summary

log = logging.getLogger(__name__)

FORMAT = "mechray.manifest"
VERSION = 1
MAIN = "manifest.json"
_PARTIAL = re.compile(r"manifest\.rank([0-9]{3,})\.json")


def partial_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def empty(config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"format": FORMAT, "version": VERSION, "created": now, "updated": now,
            "config": config or {}, "shards": []}


class ManifestError(ShardError, ValueError):
    """A manifest cannot be read or is not a mechray manifest; the message says how to rebuild it."""


def rebuild_hint(where: str) -> str:
    store = where.rsplit("/", 1)[0] if "/" in where else "."
    if where.startswith("s3://"):
        return (f"every shard carries its own entry: on the machine that captured it, "
                f"`mechray repair --rebuild <storage_path>` then `mechray sync <storage_path>` "
                f"recreate and upload the manifest of {store}")
    return (f"every shard carries its own entry: `mechray repair --rebuild {store}` recreates "
            f"the manifest from the shard files (the damaged one is kept beside it)")


def parse(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest text; :class:`ManifestError` (never a bare decode error)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ManifestError(f"{where} is not valid JSON ({str(exc)[:120]}): it is damaged or "
                            f"truncated; {rebuild_hint(where)}") from None
    return validate(doc, where)


def read(path: Path) -> dict[str, Any]:
    """Read, parse and validate a manifest file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}); "
                            f"{rebuild_hint(str(path))}") from None
    return parse(data, str(path))


def validate(doc: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest's shape, every entry included; :class:`ManifestError` naming
    ``where``, the entry and the problem.  Entries name shard files and nothing else."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a mechray manifest (format field missing or wrong); "
                            f"{rebuild_hint(where)}")
    if doc.get("version") != VERSION:
        raise ManifestError(f"{where} has manifest version {doc.get('version')!r}; this mechray "
                            f"reads version {VERSION}: upgrade mechray")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' must be a list of entries; {rebuild_hint(where)}")
    if not isinstance(doc.get("config", {}), dict):
        raise ManifestError(f"{where}: 'config' must be an object; {rebuild_hint(where)}")
    for i, entry in enumerate(shards):
        problem = entry_problem(entry)
        if problem:
            raise ManifestError(f"{where}: shard entry {i} {problem}; {rebuild_hint(where)}")
    return doc


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def entry_problem(e: Any) -> Optional[str]:
    """What is wrong with one manifest entry, or ``None`` when it is well formed."""
    if not isinstance(e, dict):
        return f"is {type(e).__name__}, not an object"
    name = e.get("file")
    if parse_shard_name(name) is None:
        return (f"names {str(name)[:120]!r}, which is not a shard file name "
                f"(activations_[rankNNN_]shard_NNNNNN_step_N.pt, no directories)")
    digest = e.get("checksum")
    if not (isinstance(digest, str) and DIGEST.fullmatch(digest)):
        return (f"({name}) has checksum {str(digest)[:80]!r}, not 'crc32c:<8 hex digits>' or "
                f"'sha256:<64 hex digits>'")
    for key in ("bytes", "index", "rank", "step"):
        if not _int(e.get(key)):
            return f"({name}) has {key}={str(e.get(key))[:40]!r}, not an integer"
    if e["bytes"] < 0:
        return f"({name}) has negative bytes"
    steps = e.get("steps", [e["step"]])
    if not (isinstance(steps, list) and all(_int(s) for s in steps)):
        return f"({name}) has steps that are not a list of integers"
    layers = e.get("layers")
    if not isinstance(layers, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("dtype"), str) and
            isinstance(v.get("shape"), list) and v["shape"] and all(_int(d) and d >= 0
                                                                    for d in v["shape"])
            for k, v in layers.items()):
        return f"({name}) has 'layers' that are not {{layer: {{'shape': [rows, ...], 'dtype'}}}}"
    rows = e.get("rows", {})
    if not (isinstance(rows, dict) and all(_int(v) for v in rows.values())):
        return f"({name}) has 'rows' that are not {{layer: count}}"
    uri = e.get("s3_uri")
    if uri is not None and not (isinstance(uri, str) and uri.startswith("s3://")):
        return f"({name}) has s3_uri {str(uri)[:80]!r}, not an s3:// URI"
    return None


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
            doc = read(self.path)
            if config:
                doc["config"] = config
        self.doc = {k: v for k, v in doc.items() if k not in ("shards", "summary")}
        self._by_file = {e["file"]: e for e in doc["shards"]}
        self._summary = Summary(self._by_file.values())
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
                old = self._by_file.get(entry["file"])
                if old is not None:
                    self._summary.remove(old)
                self._summary.add(entry)
                self._by_file[entry["file"]] = entry
                self._lines[entry["file"]] = json.dumps(entry, allow_nan=False)
            return self._commit()

    def remove(self, *files: str) -> None:
        """Forget entries (used by ``mechray repair`` for files that are gone or corrupt)."""
        with self._cond:
            for f in files:
                old = self._by_file.pop(f, None)
                if old is not None:
                    self._summary.remove(old)
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
        """The manifest as JSON text: the head (config, per-layer summary) first, then one shard
        entry per line (readable, fast to encode, and readers list layers from the head alone)."""
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        head = json.dumps({**self.doc, "summary": self._summary.to_json()}, indent=1)
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
            self._commit()  # uploads the manifest too (it may be all that was pending)
        return uploaded, len(self.pending())


def merge_rank_manifests(target: StorageTarget, config: Optional[dict[str, Any]] = None) -> int:
    """Fold every ``manifest.rank*.json`` into ``manifest.json`` (rank 0, after a barrier).

    Returns the number of shards listed.  Partial files are removed once the merged manifest is
    durable (and uploaded), so nothing is listed only in a file that is gone.
    """
    root = Path(target.local_dir)
    partials = sorted(p for p in root.glob("manifest.rank*.json") if _PARTIAL.fullmatch(p.name))
    owner = Manifest(target, config)
    docs = [read(p) for p in partials]
    count = owner.add(*[e for d in docs for e in d["shards"]])
    for p in partials:
        p.unlink(missing_ok=True)
        if target.uses_s3:
            target.client().delete_object(Bucket=target.bucket, Key=s3.key_for(target.prefix, p.name))
    log.info("merged %d rank manifests into %s (%d shards)", len(partials), owner.path, count)
    return count
