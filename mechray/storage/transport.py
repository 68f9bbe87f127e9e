"""Moving shards off the training thread: a Ray writer pool, or a writer thread without Ray.

Usage::

    from mechray.storage.transport import make_transport

    transport = make_transport(config, rank=0, world_size=1)   # Ray pool if ray.is_initialized()
    first = transport.start()             # first free shard index for this rank (never overwrite)
    transport.submit(pending_shard)       # returns at once unless max_shards_in_flight are pending
    transport.flush()                     # every shard durable and listed, or ShardWriteError
    transport.close()

``submit`` only takes a slot and queues the shard; waiting for device copies, joining chunks,
serialising, hashing and uploading all happen on writer threads (in-process) or in writer actors
(Ray), never on the caller's thread.  A shard whose write failed is kept in ``failed`` (nothing is
dropped) and named by the error ``flush`` raises; ``retry_failed()`` submits those again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Optional

from mechray.errors import ShardWriteError
from mechray.storage import s3
from mechray.storage.claim import ClaimLostError, StoreBusyError, StoreClaim, run_id_for
from mechray.storage.history import late_claim, prefix_history
from mechray.storage.manifest import Manifest
from mechray.storage.manifest_format import MAIN, partial_name
from mechray.storage.shard import PendingShard, to_wire
from mechray.storage.sink import ShardSink
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)
STALL_LOG_S = 15.0



@dataclass
class TransportStats:
    shards_submitted: int = 0
    shards_written: int = 0
    bytes_written: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    shards_dropped: int = 0
    pending_uploads: int = 0
    blocked_seconds: float = 0.0
    last_entry: Optional[dict[str, Any]] = None  # the manifest lists them all; none kept here


class Transport:
    """Bounded hand-off of :class:`PendingShard` objects to durable storage."""

    def __init__(self, target: StorageTarget, config, rank: int = 0, world_size: int = 1,
                 threads: int = 1, run_id: str = "unnamed"):
        self.target, self.config, self.rank, self.world_size = target, config, rank, world_size
        self.run_id = run_id
        self.stats = TransportStats()
        self.failed: dict[str, PendingShard] = {}
        self._errors: dict[str, BaseException] = {}
        self._slots = threading.BoundedSemaphore(config.max_shards_in_flight)
        self._lock = threading.Lock()
        self._futures: set[Future] = set()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mechray-writer")
        self._closed = False
        self._fatal: Optional[ClaimLostError] = None   # the claim was taken over: stop

    # --- subclasses ----------------------------------------------------------------------------
    def start(self) -> int:
        """Claim the store for this run (``StoreBusyError`` if another run writes there) and
        return the first shard index this rank may use."""
        raise NotImplementedError

    def _release(self) -> None:
        """Give up this process's part of the run's claim on the store."""

    def _write(self, pending: PendingShard) -> dict[str, Any]:
        raise NotImplementedError

    def _sync_pending(self, budget_s: float) -> tuple[int, int]:
        """Retry uploads left pending by an S3 outage; ``(uploaded, still_pending)``."""
        raise NotImplementedError

    # --- the caller's side ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise the pending write failures now (``on_write_error='raise'``): training stops at
        the next save instead of losing more shards.  The failed shards stay in ``failed``."""
        if self._fatal is not None:
            raise self._fatal
        with self._lock:
            errors = dict(self._errors)
        if errors and self.config.on_write_error == "raise":
            raise ShardWriteError(errors)

    def submit(self, pending: PendingShard) -> None:
        if self._closed:
            raise RuntimeError("transport is closed; create a new sampler to capture again")
        if self._fatal is not None:
            raise self._fatal
        t0 = time.perf_counter()
        self._slots.acquire()
        self.stats.blocked_seconds += time.perf_counter() - t0
        with self._lock:
            self.stats.shards_submitted += 1
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        fut = self._pool.submit(self._write, pending)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(functools.partial(self._finished, pending=pending))

    def _finished(self, fut: Future, pending: PendingShard) -> None:
        with self._lock:
            self._futures.discard(fut)
            self.stats.in_flight -= 1
            exc = fut.exception()
            if exc is None:
                entry = fut.result()
                self.stats.shards_written += 1
                self.stats.bytes_written += entry["bytes"]
                self.stats.last_entry = entry
                self.stats.pending_uploads += bool(entry.get("pending_upload"))
                self.failed.pop(pending.name, None)
                self._errors.pop(pending.name, None)
            elif isinstance(exc, ClaimLostError):  # fenced: kept, never dropped, and fatal
                self._fatal = exc
                self.failed[pending.name] = pending
                self._errors[pending.name] = exc
            elif self.config.on_write_error == "drop":
                self.stats.shards_dropped += 1
                log.error("DROPPED shard %s (%d dropped so far): %s. Capture goes on because "
                          "on_write_error='drop'; set it to 'raise' to stop training instead",
                          pending.name, self.stats.shards_dropped, exc)
            else:
                log.error("shard %s failed to write: %s", pending.name, exc)
                self.failed[pending.name] = pending
                self._errors[pending.name] = exc
        self._slots.release()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every submitted shard is durable and listed; raise for any that failed."""
        t0 = time.monotonic()
        while True:
            with self._lock:
                pending = set(self._futures)
            if not pending:
                break
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            done, not_done = wait(pending, timeout=STALL_LOG_S if left is None else
                                  min(left, STALL_LOG_S))
            if not_done and timeout is not None and time.monotonic() - t0 >= timeout:
                raise TimeoutError(f"{len(not_done)} shard(s) still being written after "
                                   f"{timeout}s; call flush() again or raise the timeout")
            if not_done:  # a stall says what it waits for
                log.warning("still waiting for %d shard(s) to become durable in %s%s (%.0fs so "
                            "far)", len(not_done), self.target.local_dir,
                            f" and s3://{self.target.bucket}/{self.target.prefix}"
                            if self.target.uses_s3 else "", time.monotonic() - t0)
        with self._lock:
            errors = dict(self._errors)
        if errors:
            raise ShardWriteError(errors)

    def retry_failed(self) -> None:
        """Submit every failed shard again (same names: the retry cannot duplicate)."""
        with self._lock:
            again = list(self.failed.values())
            self._errors.clear()
        for pending in again:
            self.submit(pending)

    def close(self) -> None:
        """Flush, then release the threads.  Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
            if self.stats.pending_uploads or self.target.hold_uploads:
                s3.breaker(self.target.endpoint_url).probe_now()  # a deliberate retry
                uploaded, left = self._sync_pending(self.target.retry_seconds)
                self.stats.pending_uploads = left
                if left:
                    log.warning("%d shard(s) are durable in %s but not uploaded yet (S3 down); "
                                "run `mechray sync %s` when it is back", left,
                                self.target.shard_dir, self.target.local_dir)
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._release()


class ThreadTransport(Transport):
    """Without Ray: writer threads in this process serialise and store; this process owns the
    manifest (``manifest.json``, or ``manifest.rank{r}.json`` when several ranks write)."""

    def __init__(self, target, config, rank=0, world_size=1, run_id="unnamed"):
        super().__init__(target, config, rank, world_size, threads=config.num_writers,
                         run_id=run_id)
        self.sink = ShardSink(target)
        self.claim = StoreClaim(target, run_id)
        self.claim.acquire()  # before the manifest is read: nobody else changes it from now on
        try:
            self.manifest = Manifest(target, {**config.to_dict(), "run_id": run_id},
                                     MAIN if world_size == 1 else partial_name(rank))
            self.found = prefix_history(self.claim, self.manifest, run_id,
                                        getattr(config, "s3_append", False))
            self._hold(self.found is None)
        except BaseException:
            self.claim.release()
            raise

    def _hold(self, held: bool) -> None:
        """Hold (or release) every upload: the S3 prefix is not claimed (yet)."""
        self.target = dataclasses.replace(self.target, hold_uploads=held)
        self.sink.target = self.manifest.target = self.target

    def start(self) -> int:
        return max(self.manifest.next_index(self.rank),
                   self.found.next_index(self.rank) if self.found else 0)

    def _release(self) -> None:
        try:
            self.manifest.close()     # fold the journal: manifest.json indexes every shard again
        finally:
            self.claim.release()

    def _write(self, pending: PendingShard) -> dict[str, Any]:
        try:
            self.claim.check()   # fenced: a run whose claim was taken over stops here
        except ClaimLostError as exc:  # ... and keeps the shard beside the store, unlisted
            aside = self.target.local_dir + f"/.fenced-{self.run_id}"
            ShardSink(StorageTarget(backend="local", local_dir=aside,
                                    checksum=self.target.checksum)).write(pending.materialize())
            raise ClaimLostError(f"{exc}. Shard {pending.name} is kept in {aside}") from None
        entry = self.sink.write(pending.materialize())
        self.claim.check()   # ...and before every manifest commit
        self.manifest.add(entry)
        return entry

    def _sync_pending(self, budget_s: float) -> tuple[int, int]:
        if self.target.hold_uploads:
            if not late_claim(self.claim, self.manifest, self.run_id):
                return 0, len(self.manifest.pending())
            self._hold(False)
        return self.manifest.sync_pending(budget_s)


class RayTransport(Transport):
    """With Ray: shards travel through the object store to the store's named writer actors."""

    def __init__(self, target, config, rank=0, world_size=1, run_id="unnamed"):
        super().__init__(target, config, rank, world_size, threads=config.max_shards_in_flight,
                         run_id=run_id)
        import os
        import socket

        from mechray.storage.writer_pool import WriterPool

        self.pool = WriterPool.get_or_create(target, config)
        self.member = f"{run_id}/rank{rank}/{socket.gethostname()}/{os.getpid()}/{id(self)}"
        self._joined = False

    def start(self) -> int:
        import ray

        busy = ray.get(self.pool.manifest.join.remote(self.run_id, self.member,
                                                      getattr(self.config, "s3_append", False)))
        if busy:
            raise StoreBusyError(busy)
        self._joined = True
        self._held = ray.get(self.pool.manifest.held.remote())
        return self.pool.next_index(self.rank)

    def _release(self) -> None:
        import ray

        if self._joined:
            self._joined = False
            try:
                ray.get(self.pool.manifest.leave.remote(self.member), timeout=30)
            except Exception as exc:  # the owner notices dead members on the next join
                log.warning("could not leave the writer pool's claim: %s", exc)

    def _write(self, pending: PendingShard) -> dict[str, Any]:
        import ray

        wire = ray.put(to_wire(pending.materialize()))
        done, entry = self.pool.write(pending.index * self.world_size + self.rank, wire,
                                      getattr(self, "_held", False))
        try:
            ray.get(done)
        except ray.exceptions.RayTaskError as exc:  # the owner's own error, unwrapped
            if isinstance(exc.cause, ClaimLostError):
                raise exc.cause from None
            raise
        return ray.get(entry)

    def _sync_pending(self, budget_s: float) -> tuple[int, int]:
        import ray

        return tuple(ray.get(self.pool.manifest.sync_pending.remote(budget_s)))


def ray_active() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def wants_ray(config) -> bool:
    """Whether shards go through Ray: ``use_ray``, or (when ``None``) whether Ray is running."""
    return ray_active() if config.use_ray is None else config.use_ray


def make_transport(config, rank: int = 0, world_size: int = 1,
                   run_id: Optional[str] = None) -> Transport:
    """The Ray pool when Ray is initialised (or ``use_ray=True``), else writer threads."""
    target = StorageTarget.from_config(config)
    use_ray = wants_ray(config)
    if use_ray and not ray_active():
        raise RuntimeError("use_ray=True but Ray is not initialised in this process; call "
                           "ray.init() (or ray.init(address='auto') on a cluster) first, or "
                           "leave use_ray=None to fall back to writer threads")
    cls = RayTransport if use_ray else ThreadTransport
    log.debug("mechray transport: %s for %s (rank %d/%d)", cls.__name__, target.local_dir,
              rank, world_size)
    return cls(target, config, rank, world_size, run_id=run_id_for(run_id, rank, world_size))
