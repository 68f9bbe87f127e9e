"""Where a store lives: its local directory, and its S3 bucket and prefix when it has one.

Usage::

    from mechray.storage.target import StorageTarget

    target = StorageTarget.from_config(config)       # picklable; ships to writer actors
    target.shard_dir                                 # where shard files land on local disk
    target.uri("manifest.json")                      # 's3://bucket/prefix/manifest.json' (or None)
    target = StorageTarget.from_manifest(root, doc["config"])   # the store a manifest describes
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mechray.storage import s3


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
    hold_uploads: bool = False   # the run could not claim the S3 prefix: nothing is uploaded

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
        return s3.client(self.endpoint_url, self.region, self.retry_seconds)

    @property
    def prefix_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
