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
import threading
import time
from dataclasses import dataclass
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


BUDGET_ENV = "MECHRAY_S3_RETRY_SECONDS"


def default_budget() -> float:
    """The S3 budget of clients made without one: ``$MECHRAY_S3_RETRY_SECONDS`` (set by the
    CLI's ``--s3-retry-seconds``), else the config's default of 60 s."""
    try:
        return max(0.0, float(os.environ.get(BUDGET_ENV, "60")))
    except ValueError:
        return 60.0


@dataclass(frozen=True)
class Timeouts:
    """Socket timeouts and attempts of one S3 request, derived from the outage budget: one
    request never waits much longer than the budget, even on an endpoint that accepts
    connections and never answers."""

    connect_s: float
    read_s: float
    attempts: int

    @classmethod
    def for_budget(cls, budget_s: float) -> "Timeouts":
        """Read timeout ``clamp(budget/3, 5, 60)`` s, connect ``clamp(budget/2, 1, 10)`` s,
        and as many attempts (1 to 3) as fit the budget: 60 s gives 3 x 20 s (a throttled
        read is still retried), 10 s gives 2 x 5 s, 2 s gives one 5 s attempt."""
        read = min(60.0, max(5.0, budget_s / 3))
        connect = min(10.0, max(1.0, budget_s / 2))
        return cls(connect, read, int(min(3, max(1, budget_s // read))))


def client(endpoint_url: Optional[str] = None, region: Optional[str] = None,
           budget_s: Optional[float] = None):
    """A cached boto3 S3 client (one per endpoint/region/budget/process) with lax checksums and
    connect/read timeouts and attempts derived from ``budget_s`` (default
    :func:`default_budget`); see :class:`Timeouts`."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or None
    t = Timeouts.for_budget(default_budget() if budget_s is None else budget_s)
    key = (endpoint_url, region, t, os.getpid())
    if key not in _CLIENTS:
        cfg = Config(retries={"total_max_attempts": t.attempts, "mode": "standard"},
                     request_checksum_calculation="when_required",
                     response_checksum_validation="when_required",
                     connect_timeout=t.connect_s, read_timeout=t.read_s)
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


class EndpointDown(Exception):
    """An S3 endpoint is in a known outage whose budget is spent: the call was not even tried
    (see :class:`Breaker`).  :func:`transient` counts it as transient."""


def transient(exc: BaseException) -> bool:
    """Whether an S3 error may go away by itself (endpoint down, timeouts, throttling, 5xx)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, HTTPClientError, EndpointDown)):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``'PreconditionFailed'``...), else ''."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return ""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return "PreconditionFailed" if code == "412" or status == 412 else code


class Breaker:
    """One outage budget per endpoint, shared by every caller in the process (a circuit breaker).

    The first transient failure starts the outage; every caller retries only until
    ``start + budget`` (not its own full budget), and once that has passed the breaker is
    *open*: calls fail at once with :class:`EndpointDown`, except one probe per ``budget``
    seconds.  A success closes it.  So a training thread waits at most once per outage, and
    shards written during it are kept locally as ``pending_upload`` without waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: Optional[float] = None      # monotonic start of the current outage
        self.open_until = 0.0                   # open: no call before this (but one probe)
        self.is_open = False

    def admit(self, what: str, endpoint: str) -> None:
        with self._lock:
            if not self.is_open:
                return
            now = time.monotonic()
            if now < self.open_until:
                raise EndpointDown(f"S3 endpoint {endpoint} has been unreachable for "
                                   f"{now - (self.since or now):.0f}s (outage budget spent); "
                                   f"{what} not tried, next probe in {self.open_until - now:.0f}s")
            self.open_until = now + self._probe_every  # this caller probes; others fail fast

    def failed(self, budget_s: float, started: float) -> float:
        """Record a transient failure; returns the deadline this caller may retry until (a
        caller with no budget starts the outage's clock but never trips the breaker)."""
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
            deadline = min(started, self.since) + budget_s
            if budget_s > 0 and (self.is_open or now >= deadline):
                self._trip(now, budget_s)
            return -1.0 if self.is_open or budget_s <= 0 else deadline

    def gave_up(self, budget_s: float) -> None:
        if budget_s > 0:
            with self._lock:
                self._trip(time.monotonic(), budget_s)

    def _trip(self, now: float, budget_s: float) -> None:
        if not self.is_open:
            log.warning("S3 outage budget (%.0fs) spent: calls fail fast, one probe every %.0fs",
                        budget_s, max(1.0, budget_s))
        self.is_open, self._probe_every = True, max(1.0, budget_s)
        self.open_until = max(self.open_until, now + self._probe_every)

    def probe_now(self) -> None:
        """Let the next call through at once (a deliberate retry: a run's close, ``mechray
        sync``); if it fails, the breaker stays open."""
        with self._lock:
            self.open_until = 0.0

    def ok(self) -> None:
        with self._lock:
            if self.is_open:
                log.info("S3 endpoint answers again: outage over after %.0fs",
                         time.monotonic() - (self.since or time.monotonic()))
            self.since, self.is_open, self.open_until = None, False, 0.0

    _probe_every = 1.0


_BREAKERS: dict[str, Breaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker(endpoint_url: Optional[str]) -> Breaker:
    """The process's outage breaker for one endpoint (AWS when ``None``)."""
    key = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or "aws"
    with _BREAKERS_LOCK:
        return _BREAKERS.setdefault(key, Breaker())


def probe_all() -> None:
    """Let every endpoint's next call through (``mechray sync``: a deliberate retry)."""
    with _BREAKERS_LOCK:
        gates = list(_BREAKERS.values())
    for gate in gates:
        gate.probe_now()


def with_backoff(fn, budget_s: float, what: str, endpoint_url: Optional[str] = None):
    """Call ``fn()``; retry transient S3 errors with exponential backoff within the endpoint's
    shared outage budget (:class:`Breaker`): at most ``budget_s`` from the outage's start, and
    not at all (``EndpointDown``, transient) once that is spent, but for one probe per budget."""
    gate = breaker(endpoint_url)
    name = endpoint_url or "the default S3 endpoint"
    started, delay = time.monotonic(), 0.25
    while True:
        gate.admit(what, name)
        try:
            result = fn()
        except Exception as exc:
            if isinstance(exc, EndpointDown):
                raise
            if not transient(exc):  # the endpoint answered (a 404, a 412...): it is up
                gate.ok()
                raise
            deadline = gate.failed(budget_s, started)
            if time.monotonic() + delay > deadline:
                gate.gave_up(budget_s)
                raise
            log.warning("S3 unavailable for %s (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        else:
            gate.ok()
            return result
