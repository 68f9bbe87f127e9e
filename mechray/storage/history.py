"""A store has one history: what an S3 prefix already holds, and whether this run may add to it.

Usage::

    from mechray.storage.history import claim_prefix, late_claim, prefix_history

    found = claim_prefix(target, manifest.entries(), run_id, append=config.s3_append)
    manifest.add(*found.adopt)          # appending: the prefix's shards join this store
    first = max(manifest.next_index(rank), found.next_index(rank))

    found = prefix_history(claim, manifest, run_id, append)  # the same for a writer (adopts)
    held = found is None                 # S3 unreachable: uploads wait for late_claim() at close

A run may write to an S3 prefix that is empty, or whose shards this store already lists (the
same store, run again: its local manifest is a superset of the S3 one).  A prefix holding shards
this store does not list belongs to another run: :func:`claim_prefix` raises
:class:`PrefixTakenError` naming it, unless the run appends (``s3_append=True``) or resumes the
run that wrote it (same ``run_id``): then its entries are adopted and numbering continues after
its highest shard, listed or not.  Underneath, every shard object is created with a conditional
put and a manifest is replaced only by one that still lists everything the S3 copy lists
(:func:`replace_manifest`), so even two runs that both passed this check cannot overwrite or
unlist each other's shards.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from mechray.errors import MechrayError
from mechray.storage import s3
from mechray.storage.claim import StoreBusyError, StoreClaim
from mechray.storage.manifest_format import MAIN, ManifestError, parse, read
from mechray.storage.shard import parse_shard_name
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)

_ETAGS: dict[tuple, str] = {}        # (endpoint, bucket, key) -> ETag of the manifest we last put
_ETAGS_LOCK = threading.Lock()


class StoreConflictError(MechrayError, RuntimeError):
    """An S3 object this run would create or replace holds another run's data; nothing was
    overwritten, and the message says where this run's copy stays."""

    exit_code = 4


class PrefixTakenError(StoreBusyError):
    """The S3 prefix holds another run's store; the message names it and the ways out."""


class Listing(Protocol):
    """What this module needs of a manifest owner (:class:`mechray.storage.manifest.Manifest`,
    which sits above: it uploads through the sink, which replaces S3 manifests through here)."""

    target: StorageTarget

    def entries(self) -> list[dict[str, Any]]: ...

    def add(self, *entries: dict[str, Any]) -> int: ...

    def pending(self) -> list[dict[str, Any]]: ...


@dataclass
class Found:
    """What a run found on its S3 prefix at start."""

    adopt: list[dict[str, Any]] = field(default_factory=list)   # entries joining this store
    floor: dict[int, int] = field(default_factory=dict)         # rank -> first free index

    def next_index(self, rank: int) -> int:
        return self.floor.get(rank, 0)


def _listed(target: StorageTarget) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The S3 manifest (parsed) and every shard-named object under the prefix."""
    client = target.client()
    key = s3.key_for(target.prefix, MAIN)
    try:
        body = client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
        doc: Optional[dict[str, Any]] = parse(body, f"s3://{target.bucket}/{key}")
    except Exception as exc:
        if s3.error_code(exc) not in ("NoSuchKey", "404"):
            raise
        doc = None
    names = []
    under = s3.key_for(target.prefix, "")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=under)
    for page in pages:
        for obj in page.get("Contents", []):
            name = obj["Key"][len(under):]
            if parse_shard_name(name) is not None:
                names.append(name)
    return doc, names


def claim_prefix(target: StorageTarget, local: list[dict[str, Any]], run_id: str,
                 append: bool = False) -> Found:
    """Check the prefix's history against this store's (``local`` manifest entries); see the
    module docstring.  S3 errors propagate (the caller decides what an outage means)."""
    doc, names = _listed(target)
    mine = {e["file"]: e.get("checksum") for e in local}
    entries = doc["shards"] if doc else []
    foreign = [e for e in entries if mine.get(e["file"]) != e.get("checksum")]
    listed = {e["file"] for e in entries}
    strays = [n for n in names if n not in mine and n not in listed]
    if not foreign and not strays:
        return Found()
    writer = str((doc or {}).get("config", {}).get("run_id") or "an unknown run")
    if not (append or writer == run_id):
        raise PrefixTakenError(
            f"{target.prefix_uri} already holds another store ({len(entries)} shard(s) listed "
            f"by its manifest{f', {len(strays)} unlisted' if strays else ''}, written by "
            f"{writer!r}) that this store ({target.local_dir}) does not list; writing here "
            f"would mix two histories. Give this run its own s3_prefix, or pass "
            f"MechIntConfig(s3_append=True) to add to that store (its shards are listed and "
            f"numbering continues after them)")
    floor: dict[int, int] = {}
    for name in [e["file"] for e in entries] + names:
        parsed = parse_shard_name(name)
        if parsed:
            floor[parsed["rank"]] = max(floor.get(parsed["rank"], 0), parsed["index"] + 1)
    log.info("%s: appending to the store there (%d shard(s) adopted, %d unlisted object(s) "
             "skipped over); numbering continues after them", target.prefix_uri, len(foreign),
             len(strays))
    return Found(adopt=[dict(e) for e in foreign], floor=floor)


def prefix_history(claim: StoreClaim, manifest: Listing, run_id: str,
                   append: bool) -> Optional[Found]:
    """After ``claim.acquire()``: check the S3 prefix's history (:func:`claim_prefix`) and adopt
    what appending takes over.  ``None`` when S3 could not be reached: the run may not upload
    until it claims the prefix (:func:`late_claim`).  Ranks joining their run's claim trust the
    rank that took it."""
    target = manifest.target
    if not target.uses_s3 or claim.s3_state == "joined":
        return Found()
    if claim.s3_state != "owned":
        return None
    try:
        found = s3.with_backoff(lambda: claim_prefix(target, manifest.entries(), run_id, append),
                                target.retry_seconds, target.prefix_uri, target.endpoint_url)
    except PrefixTakenError:
        raise
    except Exception as exc:
        if not s3.transient(exc):
            raise
        log.warning("could not read %s's history (%s); uploads wait until it is claimed",
                    target.prefix_uri, exc)
        return None
    if found.adopt:
        manifest.add(*found.adopt)
    return found


def late_claim(claim: StoreClaim, manifest: Listing, run_id: str) -> bool:
    """A run that could not claim its S3 prefix at start tries again (at close): whether its
    held uploads may go now.  Only into a prefix whose history is this store's: shards are
    already numbered, so another run's store there means they stay local (logged, with the fix)."""
    target = manifest.target
    try:
        if not claim.acquire_s3():
            log.warning("S3 still unreachable: %d shard(s) stay in %s; run `mechray sync %s` "
                        "when it is back", len(manifest.pending()), target.shard_dir,
                        target.local_dir)
            return False
        found = s3.with_backoff(lambda: claim_prefix(target, manifest.entries(), run_id),
                                0.0, target.prefix_uri, target.endpoint_url)
    except StoreBusyError as exc:
        log.error("%d shard(s) stay in %s and are not uploaded: %s", len(manifest.pending()),
                  target.shard_dir, exc)
        return False
    except Exception as exc:
        if not s3.transient(exc):
            raise
        log.warning("S3 unreachable (%s): run `mechray sync %s` when it is back", exc,
                    target.local_dir)
        return False
    return not found.adopt and not found.floor


def replace_manifest(target: StorageTarget, path: Path, key: str) -> None:
    """Put the local manifest ``path`` at ``key`` without unlisting anything: conditional on
    the ETag this process last put (``If-Match``) or on there being none (``If-None-Match``);
    when S3 holds a manifest this process did not write, it is replaced only if the local one
    lists every shard it lists (same checksums), else :class:`StoreConflictError`."""
    client = target.client()
    ident = (target.endpoint_url, target.bucket, key)
    algo = {"ChecksumAlgorithm": target.s3_checksum} if target.s3_checksum else {}
    for _ in range(3):
        with _ETAGS_LOCK:
            known = _ETAGS.get(ident)
        cond = {"IfMatch": known} if known else {"IfNoneMatch": "*"}
        try:
            with open(path, "rb") as fh:
                etag = client.put_object(Bucket=target.bucket, Key=key, Body=fh, **cond,
                                         **algo)["ETag"]
        except Exception as exc:
            if s3.error_code(exc) not in ("PreconditionFailed", "NoSuchKey",
                                          "ConditionalRequestConflict"):
                raise
            current = _theirs(client, target, key)
            with _ETAGS_LOCK:
                if current is None:
                    _ETAGS.pop(ident, None)
                    continue
                theirs, their_etag = current
                lost = _unlisted(theirs, path)
                if lost:
                    raise StoreConflictError(
                        f"s3://{target.bucket}/{key} lists {len(lost)} shard(s) that this "
                        f"store ({target.local_dir}) does not (e.g. {lost[0]}): another run "
                        f"writes to {target.prefix_uri}. The S3 manifest was not replaced; "
                        f"this store's manifest stays in {path}. Give this run its own "
                        f"s3_prefix") from None
                _ETAGS[ident] = their_etag
            continue
        with _ETAGS_LOCK:
            _ETAGS[ident] = etag
        return
    raise StoreConflictError(f"s3://{target.bucket}/{key} kept changing while this run "
                             f"replaced it: another run writes to {target.prefix_uri}")


def _theirs(client, target: StorageTarget, key: str) -> Optional[tuple[bytes, str]]:
    try:
        obj = client.get_object(Bucket=target.bucket, Key=key)
    except Exception as exc:
        if s3.error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    return obj["Body"].read(), obj["ETag"]


def _unlisted(theirs: bytes, path: Path) -> list[str]:
    """Shards the S3 manifest lists that the local one at ``path`` does not (same checksum)."""
    try:
        doc = parse(theirs, "the S3 manifest")
    except ManifestError:
        return []      # a damaged S3 manifest lists nothing a reader could use: replace it
    mine = {e["file"]: e.get("checksum") for e in read(path)["shards"]}
    return [e["file"] for e in doc["shards"] if mine.get(e["file"]) != e.get("checksum")]
