"""boto3 plumbing shared by the writers and the shard store.

Usage::

    from mechray.storage.s3 import client, parse_uri

    bucket, prefix = parse_uri("s3://my-bucket/exp001/activations")
    s3 = client(endpoint_url="http://127.0.0.1:9000")

Credentials come from boto3's normal chain (environment, profile, IAM role); mechray never
stores them.  Uploads carry a checksum S3 verifies server-side (``s3_checksum_algorithm``,
default CRC32); other requests compute checksums only where S3 requires them, so S3-compatible
stores (MinIO, Ceph, moto, R2) accept them.  End to end, integrity is mechray's own checksum per
shard (CRC32C, or sha256), checked on every read.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

log = logging.getLogger(__name__)

_CLIENTS: dict[tuple, object] = {}


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``('bucket', 'some/prefix')``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI; write it as s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; write it as s3://bucket/prefix")
    return bucket, prefix.strip("/")


def key_for(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def client(endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """A cached boto3 S3 client (one per endpoint/region/process) with retries and lax checksums."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or None
    key = (endpoint_url, region, os.getpid())
    if key not in _CLIENTS:
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"},
                     request_checksum_calculation="when_required",
                     response_checksum_validation="when_required",
                     connect_timeout=5, read_timeout=60)
        _CLIENTS[key] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region or
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=cfg)
    return _CLIENTS[key]


def get_bytes(s3, bucket: str, key: str, size: int, part: int = 8 << 20,
              parallel: int = 4) -> bytes | bytearray:
    """An object's bytes in memory: one GET, or ``parallel`` ranged GETs of ``part`` bytes
    written into one buffer when ``size`` (the expected length) is over ``part``."""
    if size <= part or parallel <= 1:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    from concurrent.futures import ThreadPoolExecutor

    buf = bytearray(size)
    view = memoryview(buf)

    def fetch(start: int) -> int:
        end = min(start + part, size) - 1
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
        got = body.read()
        if len(got) != end - start + 1:
            raise ValueError(f"ranged GET bytes={start}-{end} returned {len(got)} bytes: the "
                             f"object is shorter than {size} bytes")
        view[start:start + len(got)] = got
        return len(got)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="mechray-s3-get") as pool:
        total = sum(pool.map(fetch, range(0, size, part)))
    return buf if total == size else buf[:total]


def transfer_config(threshold_mb: int = 64):
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    return TransferConfig(multipart_threshold=threshold_mb * mb,
                          multipart_chunksize=max(8, threshold_mb // 4) * mb,
                          max_concurrency=4, use_threads=True)


def transient(exc: BaseException) -> bool:
    """Whether an S3 error may go away by itself (endpoint down, timeouts, throttling, 5xx)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def with_backoff(fn, budget_s: float, what: str):
    """Call ``fn()``; retry transient S3 errors with exponential backoff for ``budget_s`` seconds."""
    deadline, delay = time.monotonic() + budget_s, 0.25
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("S3 unavailable for %s (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
