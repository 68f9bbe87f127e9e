"""A store has one history: what an S3 prefix already holds, and whether this run may add to it.

Usage::

    from mechray.storage.history import claim_prefix

    found = claim_prefix(target, manifest.entries(), run_id, append=config.s3_append)
    manifest.add(*found.adopt)          # appending: the prefix's shards join this store
    first = max(manifest.next_index(rank), found.next_index(rank))

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
from typing import Any, Optional

from mechray.storage import s3
from mechray.storage.claim import StoreBusyError
from mechray.storage.shard import parse_shard_name
from mechray.storage.sink import StorageTarget, StoreConflictError

log = logging.getLogger(__name__)

MAIN = "manifest.json"
_ETAGS: dict[tuple, str] = {}        # (endpoint, bucket, key) -> ETag of the manifest we last put
_ETAGS_LOCK = threading.Lock()


class PrefixTakenError(StoreBusyError):
    """The S3 prefix holds another run's store; the message names it and the ways out."""


@dataclass
class Found:
    """What a run found on its S3 prefix at start."""

    adopt: list[dict[str, Any]] = field(default_factory=list)   # entries joining this store
    floor: dict[int, int] = field(default_factory=dict)         # rank -> first free index

    def next_index(self, rank: int) -> int:
        return self.floor.get(rank, 0)


def _listed(target: StorageTarget) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The S3 manifest (parsed) and every shard-named object under the prefix."""
    from mechray.storage.manifest import parse

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
    from mechray.storage.manifest import ManifestError, parse, read

    try:
        doc = parse(theirs, "the S3 manifest")
    except ManifestError:
        return []      # a damaged S3 manifest lists nothing a reader could use: replace it
    mine = {e["file"]: e.get("checksum") for e in read(path)["shards"]}
    return [e["file"] for e in doc["shards"] if mine.get(e["file"]) != e.get("checksum")]
