"""One writing run per store: a claim (run id, host, pid) on local disk and on S3.

Usage::

    from mechray.storage.claim import StoreClaim, run_id_for

    claim = StoreClaim(target, run_id_for(config.run_id, rank, world_size))
    claim.acquire()      # StoreBusyError naming the holder when another live run writes here
    ...                  # write shards; a daemon thread refreshes the claim's heartbeat
    claim.release()      # only the claim's owner removes it

The claim belongs to the *run*, not the process: ranks of one run (same run id) join it, and a
resumed run (its old id, e.g. from ``MechIntCallback.state_dict``) takes it over.  A claim is
stale, and another run may take it, when its owner's process is gone (same host) or it has not
been rewritten for ``stale_after_s`` *on the store's clock* (the lock file's mtime against a
file touched now in the same directory; the S3 object's ``LastModified`` against the S3
response's ``Date``), so a writer whose wall clock is off neither steals nor keeps a claim.
A claim taken over is fenced: :meth:`StoreClaim.check` (called before every shard write and
manifest commit) raises :class:`ClaimLostError` once the claim names another owner.
Local disk: ``{storage_path}/.mechray.lock`` (JSON), changed
under an OS file lock.  S3: ``{prefix}/.mechray.lock``, created with a conditional write
(``If-None-Match: *``) and taken over with ``If-Match``; an S3-compatible store that ignores
those headers is caught by reading the claim back (a check-then-write, so two runs starting in
the same instant could still both pass there: the local claim does not have that gap).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from mechray.errors import ConfigError, MechrayError
from mechray.storage import s3
from mechray.storage.files import atomic_write
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)

LOCK = ".mechray.lock"
STALE_AFTER_S = 300.0


class StoreBusyError(MechrayError, RuntimeError):
    """Another live run is writing to this store; the message names it and the ways out."""

    exit_code = 4


class ClaimLostError(StoreBusyError):
    """This run's claim was taken over (it was judged stale: paused, partitioned, or its
    heartbeat could not be written); the run stops writing so two runs never write one store."""


_MAX_PID = 2 ** 31 - 1


@dataclass
class Holder:
    """What a claim records about the run holding a store."""

    run_id: str
    host: str
    pid: int
    token: str           # this claim's owner (a process, or a Ray actor id that survives restarts)
    started: float
    heartbeat: float

    def describe(self) -> str:
        return (f"run {self.run_id!r} (host {self.host}, pid {self.pid}, started "
                f"{_when(self.started)}, last heartbeat {_when(self.heartbeat)})")

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        """The holder a claim file names, or ``None`` for a damaged or forged one (a claim
        protects nothing unless every field is sane: a pid that can exist, finite times)."""
        try:
            doc = json.loads(data)
            held = cls(run_id=str(doc["run_id"])[:200], host=str(doc["host"])[:255],
                       pid=int(doc["pid"]), token=str(doc["token"])[:200],
                       started=float(doc["started"]), heartbeat=float(doc["heartbeat"]))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            return None  # a damaged claim protects nothing: treated as stale
        if isinstance(doc["pid"], bool) or not 0 < held.pid <= _MAX_PID or \
                not (math.isfinite(held.started) and math.isfinite(held.heartbeat)):
            return None
        return held


def _when(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return "at an impossible time"


def run_id_for(run_id: Optional[str], rank: int = 0, world_size: int = 1) -> str:
    """The id of the run this process belongs to, the same on every rank of one run.

    In order: ``run_id`` (config), ``$MECHRAY_RUN_ID``, ``$TORCHELASTIC_RUN_ID`` (torchrun), rank
    0's new id broadcast over ``torch.distributed`` when it is initialised; with one process a
    new id.  Several ranks without any of these cannot agree on an id: that is an error.
    """
    for value in (run_id, os.environ.get("MECHRAY_RUN_ID"),
                  os.environ.get("TORCHELASTIC_RUN_ID") if world_size > 1 else None):
        if value and value.lower() != "none":
            return value
    fresh = f"run-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    if world_size <= 1:
        return fresh
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
        box = [fresh if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    raise ValueError(f"rank {rank} of {world_size}: the ranks of one run must share a run id to "
                     f"write one store, and none is known. Set MechIntConfig(run_id=...) (or "
                     f"$MECHRAY_RUN_ID) to the same string on every rank, launch with torchrun, or "
                     f"initialise torch.distributed before the sampler")


def _pid_alive(pid: int) -> bool:
    if not 0 < pid <= _MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


class StoreClaim:
    """A run's claim on one store (local lock file, plus the S3 claim object for S3 backends)."""

    def __init__(self, target: StorageTarget, run_id: str, *, token: Optional[str] = None,
                 stale_after_s: Optional[float] = None):
        self.target, self.run_id = target, run_id
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.token = token or uuid.uuid4().hex
        self.path = Path(target.local_dir) / LOCK
        self.owned = False          # we wrote the claim (vs joined a claim of our run)
        #: the S3 claim: "owned" (we wrote it), "joined" (our run's), "unreachable" (S3 was
        #: down: this run must not upload until it claims the prefix), or "" (no S3)
        self.s3_state = ""
        self.lost: Optional[str] = None
        self._checked_s3 = 0.0
        self._s3_etag: Optional[str] = None
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    # --- public ----------------------------------------------------------------------------------
    def acquire(self) -> "StoreClaim":
        """Claim the store for ``run_id`` (or join our run's claim); ``StoreBusyError`` if another
        live run holds it."""
        self._acquire_local()
        if self.target.uses_s3:
            try:
                self._acquire_s3()
            except StoreBusyError:
                self.release()
                raise
        if self.owned and self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                          name="mechray-claim-heartbeat")
            self._beat.start()
        return self

    def release(self) -> None:
        """Give the store up (only the claim's owner removes the claim).  Safe to call twice."""
        self._stop.set()
        if not self.owned:
            return
        self.owned = False
        with self._guard():
            held = self._read_local()
            if held is not None and held.token == self.token:
                self.path.unlink(missing_ok=True)
        if self.target.uses_s3 and self._s3_etag:
            try:
                client, bucket, key = self._s3()
                obj = s3.with_backoff(lambda: client.get_object(Bucket=bucket, Key=key), 0.0,
                                      f"s3://{bucket}/{key}", self.target.endpoint_url)
                held = Holder.parse(obj["Body"].read())
                if held is not None and held.token == self.token:
                    client.delete_object(Bucket=bucket, Key=key, IfMatch=obj["ETag"])
            except Exception as exc:  # the claim goes stale by itself; never fail a close
                log.warning("could not remove the S3 claim s3://%s/%s (%s); it turns stale in "
                            "%.0fs", self.target.bucket, self._s3()[2], exc, self.stale_after_s)

    def holder(self) -> Optional[Holder]:
        return self._read_local()

    def check(self) -> None:
        """Fencing: raise :class:`ClaimLostError` when this run no longer holds the store (the
        local claim names another run or owner; the S3 claim, re-read at most every
        ``stale_after_s / 30`` seconds of this process's time, names another owner).  An S3
        outage does not fail the check: shard puts are conditional, so nothing is overwritten."""
        if self.lost:
            raise ClaimLostError(self.lost)
        with self._guard():
            held = self._read_local()
        if held is not None and self._taken(held, self.owned):  # (gone: nobody took it)
            self._lose(held, str(self.path))
        if self.s3_state not in ("owned", "joined"):
            return
        now = time.monotonic()
        if now - self._checked_s3 < self.stale_after_s / 30:
            return
        client, bucket, key = self._s3()
        try:
            body = s3.with_backoff(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
                                   0.0, f"s3://{bucket}/{key}", self.target.endpoint_url)
        except Exception as exc:
            if s3.error_code(exc) not in ("NoSuchKey", "404"):
                if s3.transient(exc):
                    return
                raise
            body = b""
        held = Holder.parse(body)
        if held is not None and self._taken(held, self.s3_state == "owned"):
            self._lose(held, f"s3://{bucket}/{key}")
        self._checked_s3 = now

    def _taken(self, held: Holder, owner: bool) -> bool:
        """Whether ``held`` is someone else's claim: another owner (we wrote ours), or another
        run (we joined our run's)."""
        return held.token != self.token if owner else held.run_id != self.run_id

    def _lose(self, held: Optional[Holder], where: str) -> None:
        self.lost = (f"this run ({self.run_id!r}) lost its claim on {self.target.local_dir} "
                     f"({where} now names {held.describe() if held else 'nobody'}): it was "
                     f"judged stale (this process paused, or its heartbeat could not be written "
                     f"for {self.stale_after_s:.0f}s) and taken over. This run stops writing "
                     f"so two runs never write one store; shards it had not listed stay in "
                     f"{self.target.shard_dir}. Restart it on another storage_path/s3_prefix")
        self._stop.set()
        log.error("%s", self.lost)
        raise ClaimLostError(self.lost)

    # --- local disk --------------------------------------------------------------------------------
    def _guard(self):
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".guard", timeout=60)

    def _read_local(self) -> Optional[Holder]:
        try:
            return Holder.parse(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def _local_age(self) -> float:
        """Seconds since the claim file was last written, on the store's clock (call with the
        guard held: the guard file is touched now and the two mtimes compared)."""
        guard = Path(str(self.path) + ".guard")
        try:
            os.utime(guard)
            return guard.stat().st_mtime - self.path.stat().st_mtime
        except FileNotFoundError:
            return math.inf

    def _mine(self, now: float) -> Holder:
        return Holder(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                      token=self.token, started=now, heartbeat=now)

    def stale(self, held: Holder, age: float) -> bool:
        """The holder is gone: its process died (same host) or its claim has not been
        rewritten for ``stale_after_s`` (``age``, measured on the store's clock)."""
        if held.host == socket.gethostname() and not _pid_alive(held.pid):
            return True
        return age > self.stale_after_s

    def _acquire_local(self) -> None:
        with self._guard():
            held = self._read_local()
            if held is not None and held.token != self.token:
                stale = self.stale(held, self._local_age())
                if held.run_id == self.run_id and not stale:
                    log.debug("joining run %s's claim on %s", self.run_id, self.target.local_dir)
                    return
                if held.run_id != self.run_id and not stale:
                    raise self._busy(held, str(self.path))
                log.warning("taking over the claim on %s from %s: %s", self.target.local_dir,
                            held.describe(), "resumed run" if held.run_id == self.run_id
                            else "its holder is gone")
            elif self.path.exists() and held is None:
                log.warning("replacing the unreadable claim %s", self.path)
            atomic_write(self.path, json.dumps(asdict(self._mine(time.time()))).encode())
            self.owned = True

    def _busy(self, held: Holder, where: str) -> StoreBusyError:
        here = held.host == socket.gethostname() and held.pid == os.getpid()
        return StoreBusyError(
            f"the store {self.target.local_dir} is being written by {held.describe()} "
            f"(claim {where}); a second run would overwrite or drop its shards. "
            + ("That run is another sampler in this process: close() it first (or use "
               "`with ActivationSampler(...)`). " if here else "") +
            f"Choose another "
            f"storage_path (or s3_prefix) for this run; to resume that run, pass "
            f"MechIntConfig(run_id={held.run_id!r}) (MechIntCallback does from its checkpoint); "
            f"a claim whose holder died is taken over by itself after {self.stale_after_s:.0f}s, "
            f"or at once with `mechray unlock {self.target.local_dir}`")

    # --- S3 --------------------------------------------------------------------------------------
    def _s3(self) -> tuple[Any, str, str]:
        return self.target.client(), str(self.target.bucket), s3.key_for(self.target.prefix, LOCK)

    def _acquire_s3(self) -> None:
        """Take (or join) the S3 claim within the outage budget; when S3 cannot be reached,
        ``s3_state`` says so and the run's uploads are held until it claims the prefix."""
        client, bucket, key = self._s3()
        where = f"s3://{bucket}/{key}"

        def attempt() -> None:
            body = json.dumps(asdict(self._mine(time.time()))).encode()
            try:
                self._s3_etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                  IfNoneMatch="*")["ETag"]
            except Exception as exc:
                if s3.error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                obj = client.get_object(Bucket=bucket, Key=key)
                held = Holder.parse(obj["Body"].read())
                age = _s3_age(obj)
                if held is not None and held.token != self.token and not self.stale(held, age):
                    if held.run_id == self.run_id:
                        self.s3_state = "joined"
                        return  # our run already holds it
                    raise self._busy(held, where) from None
                log.warning("taking over the S3 claim %s from %s", where,
                            held.describe() if held else "an unreadable claim")
                self._s3_etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                  IfMatch=obj["ETag"])["ETag"]
            back = Holder.parse(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            if back is None or (back.token != self.token and back.run_id != self.run_id):
                raise self._busy(back or self._mine(time.time()), where)
            self.s3_state = "owned"

        try:
            s3.with_backoff(attempt, self.target.retry_seconds, where, self.target.endpoint_url)
        except StoreBusyError:
            raise
        except Exception as exc:
            if s3.error_code(exc) == "NoSuchBucket":
                raise ConfigError(f"s3_bucket={bucket!r} does not exist at "
                                  f"{self.target.endpoint_url or 'AWS'}; create it, or fix "
                                  f"s3_bucket / s3_endpoint_url") from None
            if not s3.transient(exc):
                raise
            self.s3_state = "unreachable"
            log.warning("S3 claim %s not taken (%s): this run writes to %s only; its uploads "
                        "wait until it claims the prefix (at close, or `mechray sync %s`)",
                        where, exc, self.target.local_dir, self.target.local_dir)

    def acquire_s3(self) -> bool:
        """Try again to claim the S3 prefix (after an outage at start); whether it is ours."""
        if self.s3_state in ("owned", "joined"):
            return True
        self._acquire_s3()
        return self.s3_state in ("owned", "joined")

    # --- heartbeat -------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        every = max(0.05, self.stale_after_s / 5)
        while not self._stop.wait(every):
            try:
                self.beat()
            except Exception as exc:  # a missed beat is logged; the next one tries again
                log.warning("claim heartbeat on %s failed: %s", self.target.local_dir, exc)

    def beat(self) -> None:
        """Refresh the heartbeat (the daemon thread calls this every ``stale_after_s / 5``)."""
        now = time.time()
        with self._guard():
            held = self._read_local()
            if held is None:
                log.error("the claim on %s was removed while this run (%s) still writes",
                          self.target.local_dir, self.run_id)
                return
            if held.token != self.token:
                self.lost = (f"the claim on {self.target.local_dir} was taken by "
                             f"{held.describe()} while this run ({self.run_id!r}) still "
                             f"writes; this run stops writing")
                log.error("%s", self.lost)
                self._stop.set()
                return
            held.heartbeat = now
            atomic_write(self.path, json.dumps(asdict(held)).encode())
        if self.target.uses_s3 and self._s3_etag:
            client, bucket, key = self._s3()
            held.host, held.pid = socket.gethostname(), os.getpid()
            body = json.dumps(asdict(held)).encode()
            try:
                self._s3_etag = s3.with_backoff(
                    lambda: client.put_object(Bucket=bucket, Key=key, Body=body,
                                              IfMatch=self._s3_etag)["ETag"],
                    0.0, f"s3://{bucket}/{key}", self.target.endpoint_url)
            except Exception as exc:
                if s3.error_code(exc) == "PreconditionFailed":
                    self.lost = (f"the S3 claim s3://{bucket}/{key} was taken over while this "
                                 f"run ({self.run_id!r}) still writes; this run stops writing")
                    log.error("%s", self.lost)
                    self._stop.set()
                    return
                raise


def _s3_age(obj: dict[str, Any]) -> float:
    """Seconds since an S3 object was written, on S3's clock (its ``LastModified`` against the
    response's ``Date`` header)."""
    from email.utils import parsedate_to_datetime

    try:
        date = obj["ResponseMetadata"]["HTTPHeaders"]["date"]
        return (parsedate_to_datetime(date) - obj["LastModified"]).total_seconds()
    except (KeyError, TypeError, ValueError):  # no Date header: this machine's clock it is
        return time.time() - obj["LastModified"].timestamp()


def unlock(path) -> Optional[str]:
    """Remove a store's claim by hand (``mechray unlock``); returns a description of the claim
    it removed (a damaged or forged one included), or ``None`` when there was none."""
    p = Path(path).expanduser().resolve() / LOCK
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    p.unlink(missing_ok=True)
    held = Holder.parse(data)
    return f"the claim of {held.describe()}" if held else \
        f"a damaged claim file ({len(data)} bytes, not a valid claim)"
