"""Where shards go: local disk (atomic temp + fsync + rename), S3 (boto3), or both.

Usage::

    from mechray.storage.sink import StorageTarget, ShardSink

    target = StorageTarget.from_config(config)       # picklable; ships to writer actors
    sink = ShardSink(target)
    entry = sink.write(payload)                      # durable when it returns; manifest entry

With ``storage_backend='s3'`` the shard is written to a local spool (``{storage_path}/.spool``)
first and removed from it only once the upload has succeeded, so a failed upload loses nothing.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mechray.errors import StorageFullError
from mechray.storage import s3
from mechray.storage.shard import entry_for, parse_shard_name, save, temp_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageTarget:
    """The resolved, picklable description of one store (absolute paths, bucket, prefix)."""

    backend: str
    local_dir: str
    bucket: Optional[str] = None
    prefix: str = ""
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    multipart_threshold_mb: int = 64
    retry_seconds: float = 60.0
    checksum: str = "crc32c"
    s3_checksum: Optional[str] = "CRC32"

    @classmethod
    def from_config(cls, config) -> "StorageTarget":
        return cls(backend=config.storage_backend, local_dir=str(config.local_dir),
                   bucket=config.s3_bucket, prefix=config.s3_prefix,
                   endpoint_url=config.endpoint_url, region=config.s3_region,
                   multipart_threshold_mb=config.s3_multipart_threshold_mb,
                   retry_seconds=config.s3_retry_seconds, checksum=config.checksum,
                   s3_checksum=config.s3_checksum_algorithm)

    @classmethod
    def from_manifest(cls, local_dir, config: dict[str, Any], endpoint_url: Optional[str] = None
                      ) -> "StorageTarget":
        """The target a store directory was written with (its manifest records the config)."""
        from mechray.config import MechIntConfig

        if not config:
            return cls(backend="local", local_dir=str(Path(local_dir).resolve()))
        # the storage fields only: reaching the store needs no more, and checking the recorded
        # analysis names would import every analysis (torch) into `mechray sync`
        config = {k: v for k, v in config.items()
                  if k.startswith(("s3_", "storage_")) or k in ("sample_layers", "checksum")}
        cfg = MechIntConfig.from_dict({**config, "storage_path": str(local_dir),
                                       **({"s3_endpoint_url": endpoint_url} if endpoint_url else {})})
        return cls.from_config(cfg)

    @property
    def uses_s3(self) -> bool:
        return self.backend in ("s3", "both")

    @property
    def shard_dir(self) -> Path:
        """Where shard files land on local disk (the spool for the S3-only backend)."""
        return Path(self.local_dir) / ".spool" if self.backend == "s3" else Path(self.local_dir)

    @property
    def key(self) -> str:
        """A short stable id of this store, used to name its Ray actors."""
        ident = f"{self.backend}|{self.local_dir}|{self.bucket}|{self.prefix}"
        return hashlib.sha1(ident.encode()).hexdigest()[:12]

    def uri(self, name: str) -> Optional[str]:
        return f"s3://{self.bucket}/{s3.key_for(self.prefix, name)}" if self.uses_s3 else None

    def client(self):
        return s3.client(self.endpoint_url, self.region)


def atomic_write(path: Path, data: bytes | memoryview | Callable[[Any], Any]) -> Any:
    """Write ``path`` so readers see the old file or the whole new one, never a part.

    ``data`` is bytes, or a function that writes into the open temp file (its return value is
    returned).  The temp file is fsynced, renamed over ``path``, and the directory fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; readers may be other users of a shared disk
        with os.fdopen(fd, "wb") as fh:
            result = data(fh) if callable(data) else fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return result



def upload(target: StorageTarget, path: Path, name: str, budget_s: Optional[float] = None) -> str:
    """Upload a local file to ``{prefix}/{name}``, retrying a down endpoint with backoff for
    ``budget_s`` (default ``target.retry_seconds``); returns its ``s3://`` URI.

    With ``target.s3_checksum`` (default ``CRC32``) boto3 sends the object's checksum (per part
    for multipart uploads) and S3 verifies it before storing the object, so a body damaged on the
    way is refused (and retried) rather than stored."""
    key = s3.key_for(target.prefix, name)
    extra = {"ChecksumAlgorithm": target.s3_checksum} if target.s3_checksum else None
    s3.with_backoff(lambda: target.client().upload_file(
        str(path), target.bucket, key, ExtraArgs=extra,
        Config=s3.transfer_config(target.multipart_threshold_mb)),
        target.retry_seconds if budget_s is None else budget_s, f"s3://{target.bucket}/{key}")
    uri = target.uri(name)
    assert uri is not None  # an S3 target always has a URI
    return uri


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
            entry["s3_uri"] = upload(self.target, path, entry["file"], budget_s)
        except Exception as exc:
            if not s3.transient(exc):
                raise
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
