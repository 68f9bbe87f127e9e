"""One writing run per store: a claim (run id, host, pid) on local disk and on S3.

Usage::

    from mechray.storage.claim import StoreClaim, run_id_for

    claim = StoreClaim(target, run_id_for(config.run_id, rank, world_size))
    claim.acquire()      # StoreBusyError naming the holder when another live run writes here
    ...                  # write shards; a daemon thread refreshes the claim's heartbeat
    claim.release()      # only the claim's owner removes it

The claim belongs to the *run*, not the process: ranks of one run (same run id) join it, and a
resumed run (its old id, e.g. from ``MechIntCallback.state_dict``) takes it over.  A claim is
stale, and another run may take it, when its owner's process is gone (same host) or its heartbeat
is older than ``stale_after_s``.  Local disk: ``{storage_path}/.mechray.lock`` (JSON), changed
under an OS file lock.  S3: ``{prefix}/.mechray.lock``, created with a conditional write
(``If-None-Match: *``) and taken over with ``If-Match``; an S3-compatible store that ignores
those headers is caught by reading the claim back (a check-then-write, so two runs starting in
the same instant could still both pass there: the local claim does not have that gap).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from mechray.errors import MechrayError
from mechray.storage import s3
from mechray.storage.sink import StorageTarget, atomic_write

log = logging.getLogger(__name__)

LOCK = ".mechray.lock"
STALE_AFTER_S = 300.0


class StoreBusyError(MechrayError, RuntimeError):
    """Another live run is writing to this store; the message names it and the ways out."""

    exit_code = 4


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
        age = time.time() - self.heartbeat
        return (f"run {self.run_id!r} (host {self.host}, pid {self.pid}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(self.started))}, "
                f"last heartbeat {age:.0f}s ago)")

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        try:
            doc = json.loads(data)
            return cls(run_id=str(doc["run_id"]), host=str(doc["host"]), pid=int(doc["pid"]),
                       token=str(doc["token"]), started=float(doc["started"]),
                       heartbeat=float(doc["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged claim protects nothing: treated as stale


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreClaim:
    """A run's claim on one store (local lock file, plus the S3 claim object for S3 backends)."""

    def __init__(self, target: StorageTarget, run_id: str, *, token: Optional[str] = None,
                 stale_after_s: float = STALE_AFTER_S):
        self.target, self.run_id, self.stale_after_s = target, run_id, stale_after_s
        self.token = token or uuid.uuid4().hex
        self.path = Path(target.local_dir) / LOCK
        self.owned = False          # we wrote the claim (vs joined a claim of our run)
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
                obj = client.get_object(Bucket=bucket, Key=key)
                held = Holder.parse(obj["Body"].read())
                if held is not None and held.token == self.token:
                    client.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # the claim goes stale by itself; never fail a close
                log.warning("could not remove the S3 claim s3://%s/%s (%s); it turns stale in "
                            "%.0fs", self.target.bucket, self._s3()[2], exc, self.stale_after_s)

    def holder(self) -> Optional[Holder]:
        return self._read_local()

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

    def _mine(self, now: float) -> Holder:
        return Holder(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                      token=self.token, started=now, heartbeat=now)

    def stale(self, held: Holder) -> bool:
        """The holder is gone: its process died (same host) or its heartbeat stopped."""
        if held.host == socket.gethostname() and not _pid_alive(held.pid):
            return True
        return time.time() - held.heartbeat > self.stale_after_s

    def _acquire_local(self) -> None:
        with self._guard():
            held = self._read_local()
            if held is not None and held.token != self.token:
                if held.run_id == self.run_id and not self.stale(held):
                    log.debug("joining run %s's claim on %s", self.run_id, self.target.local_dir)
                    return
                if held.run_id != self.run_id and not self.stale(held):
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
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        body = json.dumps(asdict(self._mine(time.time()))).encode()
        try:
            try:
                self._s3_etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                  IfNoneMatch="*")["ETag"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
                obj = client.get_object(Bucket=bucket, Key=key)
                held = Holder.parse(obj["Body"].read())
                if held is not None and held.token != self.token and not self.stale(held):
                    if held.run_id == self.run_id:
                        return  # our run already holds it
                    raise self._busy(held, f"s3://{bucket}/{key}") from None
                self._s3_etag = client.put_object(Bucket=bucket, Key=key, Body=body,
                                                  IfMatch=obj["ETag"])["ETag"]
            back = Holder.parse(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            if back is None or (back.token != self.token and back.run_id != self.run_id):
                raise self._busy(back or self._mine(time.time()), f"s3://{bucket}/{key}")
        except StoreBusyError:
            raise
        except Exception as exc:
            if not s3.transient(exc) and not isinstance(exc, ClientError):
                raise
            log.warning("S3 claim s3://%s/%s not taken (%s): only the local claim guards this "
                        "store; shards are spooled locally while S3 is unavailable",
                        bucket, key, exc)

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
            if held is None or held.token != self.token:
                log.error("the claim on %s was taken by %s while this run (%s) still writes; "
                          "stop one of them", self.target.local_dir,
                          held.describe() if held else "nobody", self.run_id)
                return
            held.heartbeat = now
            atomic_write(self.path, json.dumps(asdict(held)).encode())
        if self.target.uses_s3 and self._s3_etag:
            client, bucket, key = self._s3()
            held.host, held.pid = socket.gethostname(), os.getpid()
            self._s3_etag = client.put_object(Bucket=bucket, Key=key,
                                              Body=json.dumps(asdict(held)).encode(),
                                              IfMatch=self._s3_etag)["ETag"]


def unlock(path) -> Optional[Holder]:
    """Remove a store's claim by hand (``mechray unlock``); returns the holder it named."""
    p = Path(path).expanduser().resolve() / LOCK
    try:
        held = Holder.parse(p.read_bytes())
    except FileNotFoundError:
        return None
    p.unlink(missing_ok=True)
    return held
