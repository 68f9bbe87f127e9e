"""Where shards go: local disk (atomic temp + fsync + rename), S3 (boto3), or both.

Usage::

    from mechray.storage.sink import ShardSink
    from mechray.storage.target import StorageTarget

    target = StorageTarget.from_config(config)       # picklable; ships to writer actors
    sink = ShardSink(target)
    entry = sink.write(payload)                      # durable when it returns; manifest entry

With ``storage_backend='s3'`` the shard is written to a local spool (``{storage_path}/.spool``)
first and removed from it only once the upload has succeeded, so a failed upload loses nothing.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any, Optional

from mechray.errors import StorageFullError
from mechray.storage import s3
from mechray.storage.files import atomic_write
from mechray.storage.history import StoreConflictError, replace_manifest
from mechray.storage.shard import entry_for, parse_shard_name, save, temp_target
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)


class UploadHeld(s3.EndpointDown):
    """Uploads wait: the run could not claim its S3 prefix at start (transient: the shard is
    kept locally as ``pending_upload`` until the run's close or ``mechray sync`` claims it)."""


def upload(target: StorageTarget, path: Path, name: str, budget_s: Optional[float] = None,
           checksum: Optional[str] = None) -> str:
    """Upload a local file to ``{prefix}/{name}``, retrying a down endpoint within the outage
    budget (``budget_s``, default ``target.retry_seconds``; see :func:`s3.with_backoff`);
    returns its ``s3://`` URI.

    A shard is *created*, never replaced: a conditional put (``If-None-Match: *``, on the
    single PUT or the multipart completion) that S3 refuses when the key exists.  The object
    carries the shard's own checksum (``x-amz-meta-mechray-checksum``), so a retry of our own
    upload is recognised and accepted; any other object there raises
    :class:`StoreConflictError`.  Manifests are replaced only by a manifest that still lists
    every shard the S3 copy lists (:func:`mechray.storage.history.replace_manifest`).

    With ``target.s3_checksum`` (default ``CRC32``) boto3 sends the object's checksum (per part
    for multipart uploads) and S3 verifies it before storing the object, so a body damaged on the
    way is refused (and retried) rather than stored."""
    key = s3.key_for(target.prefix, name)
    where = f"s3://{target.bucket}/{key}"
    if target.hold_uploads:
        raise UploadHeld(f"{where} not uploaded: this run could not claim "
                         f"{target.prefix_uri} at start (S3 unreachable), so its uploads wait "
                         f"for the end of the run or `mechray sync {target.local_dir}`")
    budget = target.retry_seconds if budget_s is None else budget_s
    if parse_shard_name(name) is None:
        s3.with_backoff(lambda: replace_manifest(target, path, key), budget, where,
                        target.endpoint_url)
    else:
        s3.with_backoff(lambda: create(target, path, key, checksum), budget, where,
                        target.endpoint_url)
    uri = target.uri(name)
    assert uri is not None  # an S3 target always has a URI
    return uri


def create(target: StorageTarget, path: Path, key: str, checksum: Optional[str]) -> None:
    """Create ``key`` from ``path`` unless it exists (one conditional PUT, or a multipart upload
    whose completion is conditional); an existing object is accepted only when it is this very
    shard (same mechray checksum)."""
    client = target.client()
    meta = {"mechray-checksum": checksum} if checksum else {}
    algo = {"ChecksumAlgorithm": target.s3_checksum} if target.s3_checksum else {}
    size = path.stat().st_size
    threshold = target.multipart_threshold_mb << 20
    try:
        if size < threshold:
            with open(path, "rb") as fh:
                client.put_object(Bucket=target.bucket, Key=key, Body=fh, IfNoneMatch="*",
                                  Metadata=meta, **algo)
        else:
            _multipart(client, target, path, key, size, meta, algo)
    except Exception as exc:
        if s3.error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        head = client.head_object(Bucket=target.bucket, Key=key)
        theirs = head.get("Metadata", {}).get("mechray-checksum")
        if checksum and theirs == checksum and head.get("ContentLength") == size:
            log.debug("s3://%s/%s already holds this shard (a retried upload)", target.bucket, key)
            return
        raise StoreConflictError(
            f"s3://{target.bucket}/{key} already exists and is not this run's shard (its "
            f"checksum {theirs or 'unknown'}, ours {checksum}): another run writes to "
            f"{target.prefix_uri}. Nothing was overwritten; this shard stays in "
            f"{path.parent}. Give this run its own s3_prefix (or, to publish this store under "
            f"a new prefix, set s3_prefix in the config recorded in "
            f"{Path(target.local_dir) / 'manifest.json'} and run `mechray sync "
            f"{target.local_dir}`)") from None


def _multipart(client, target: StorageTarget, path: Path, key: str, size: int,
               meta: dict[str, str], algo: dict[str, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    part = max(8, target.multipart_threshold_mb // 4) << 20
    upload_id = client.create_multipart_upload(Bucket=target.bucket, Key=key, Metadata=meta,
                                               **algo)["UploadId"]
    field = f"Checksum{target.s3_checksum}" if target.s3_checksum else None

    def send(number: int) -> dict[str, Any]:
        start = (number - 1) * part
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(min(part, size - start))
        got = client.upload_part(Bucket=target.bucket, Key=key, UploadId=upload_id,
                                 PartNumber=number, Body=body, **algo)
        done = {"PartNumber": number, "ETag": got["ETag"]}
        if field and got.get(field):
            done[field] = got[field]
        return done

    try:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="mechray-s3-part") as pool:
            parts = list(pool.map(send, range(1, (size + part - 1) // part + 1)))
        client.complete_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts}, IfNoneMatch="*")
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the bucket's lifecycle rule cleans up what this leaves
            log.debug("could not abort the multipart upload of %s: %s", key, exc)
        raise


class ShardSink:
    """Serialises, checksums and stores shards for one target (runs on writer threads/actors)."""

    def __init__(self, target: StorageTarget):
        self.target = target

    def write(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Store one shard; returns its manifest entry once it is durable.

        Durable means on local disk for ``local``, and for ``s3``/``both`` uploaded, or, when the
        endpoint stays down past ``retry_seconds``, kept in the local spool with
        ``pending_upload: true`` for ``mechray sync`` (or the writer's close) to finish.
        """
        name = payload["metadata"]["file"]
        path = self.target.shard_dir / name
        try:
            nbytes, digest = atomic_write(path, lambda fh: save(payload, fh, self.target.checksum))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    exc.errno, f"no space left on {path.parent} for shard {name}; shards "
                               f"written before it are kept and listed in the manifest. Free "
                               f"space, or point storage_path elsewhere") from exc
            raise
        entry = entry_for(payload, nbytes, digest)
        if self.target.uses_s3:
            self.upload(entry, path)
        log.debug("shard %s durable (%d bytes)", name, nbytes)
        return entry

    def upload(self, entry: dict[str, Any], path: Path, budget_s: Optional[float] = None) -> bool:
        """Upload a durable local shard; on a lasting outage mark it pending instead of failing."""
        try:
            entry["s3_uri"] = upload(self.target, path, entry["file"], budget_s,
                                     entry.get("checksum"))
        except Exception as exc:
            if not s3.transient(exc):
                raise
            if isinstance(exc, UploadHeld):
                log.debug("%s", exc)
            else:
                log.warning("S3 still unavailable; shard %s stays in %s as pending_upload (%s)",
                            entry["file"], path.parent, exc)
            entry["s3_uri"], entry["pending_upload"] = None, True
            return False
        entry.pop("pending_upload", None)
        if self.target.backend == "s3":
            path.unlink(missing_ok=True)
        return True


def orphans(target: StorageTarget, listed: set[str]) -> list[Path]:
    """Shard and temp files in the store's shard directory that the manifest does not list."""
    shard_dir = target.shard_dir
    if not shard_dir.is_dir():
        return []
    found = []
    for p in shard_dir.iterdir():
        if p.name in listed or not (parse_shard_name(p.name) or temp_target(p.name)):
            continue
        if p.is_symlink():  # a link is never adopted: it could point anywhere
            log.warning("%s is a symlink; mechray does not adopt or move links", p)
            continue
        if p.is_file():
            found.append(p)
    return sorted(found)
