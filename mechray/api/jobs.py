"""The job board: long analyses run in worker threads; clients poll them by id.

Usage::

    from mechray.api.jobs import JobBoard

    board = JobBoard(run=service.compute_job, workers=1, max_pending=16)
    job = board.submit(key, request, analysis="sae", layer="popt")   # dict: job_id, status, ...
    board.status(job["job_id"])                                      # JSON bytes (JobStatus)
    board.close()

``run(request)`` returns the finished response as JSON bytes, or ``(bytes, keep)``, or raises
:class:`~mechray.api.errors.ApiError`.  A request whose ``key`` (analysis, layer, params and
manifest version, or the upload's hash) matches a queued, running or unexpired job gets that
job instead of a new one, so a double-clicked SAE trains once; a job that failed, or whose
result failed inside (``keep`` False: an analysis error on a layer), is never handed out again:
the same request runs afresh (its own job id still answers until it expires).  At most ``max_pending`` jobs
wait or run (more: 429); finished jobs are kept ``ttl_s`` seconds and at most ``keep`` of them.
The board is plain threads (no event loop), so it works under any ASGI server and inside a Ray
Serve replica alike.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mechray.api.errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One queued, running or finished request (changed only under the board's lock)."""

    job_id: str
    key: str
    analysis_type: str
    layer_name: Optional[str]
    created: float
    status: str = "queued"                      # queued | running | done | failed
    started: Optional[float] = None
    finished: Optional[float] = None
    body: Optional[bytes] = field(default=None, repr=False)   # the response, when done
    error: Optional[dict[str, Any]] = None                    # an ErrorResponse, when failed

    @property
    def pending(self) -> bool:
        return self.status in ("queued", "running")

    def accepted(self) -> dict[str, Any]:
        """The ``JobAccepted`` body."""
        return {"job_id": self.job_id, "status": self.status,
                "analysis_type": self.analysis_type, "layer_name": self.layer_name,
                "poll": f"/interpret/jobs/{self.job_id}"}

    def head(self) -> dict[str, Any]:
        """The ``JobStatus`` body without its result."""
        return {"job_id": self.job_id, "status": self.status,
                "analysis_type": self.analysis_type, "layer_name": self.layer_name,
                "created": self.created, "started": self.started, "finished": self.finished,
                "error": self.error}


class JobBoard:
    """Thread-pool job runner with de-duplication, bounded queue and expiry."""

    def __init__(self, run: Callable[[Any], bytes | tuple[bytes, bool]], *, workers: int = 1,
                 max_pending: int = 16, ttl_s: float = 3600.0, keep: int = 256):
        self._run = run
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mechray-job")
        self.max_pending, self.ttl_s, self.keep = max_pending, ttl_s, keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_key: dict[str, str] = {}
        self._lock = threading.Lock()

    def submit(self, key: str, request: Any, *, analysis: str,
               layer: Optional[str] = None) -> dict[str, Any]:
        """Queue ``request`` (or return the job already doing it); a ``JobAccepted`` dict."""
        with self._lock:
            self._expire()
            same = self._jobs.get(self._by_key.get(key, ""))
            if same is not None and same.status != "failed":       # failed ones left _by_key
                return same.accepted()
            if self.pending() >= self.max_pending:
                raise ApiError(429, "too_many_jobs",
                               f"{self.max_pending} jobs are already queued or running; poll "
                               "them and retry later (or raise api_max_pending_jobs)",
                               headers={"Retry-After": "5"})
            job = Job(uuid.uuid4().hex, key, analysis, layer, time.time())
            self._jobs[job.job_id] = job
            self._by_key[key] = job.job_id
        self._pool.submit(self._work, job, request)
        return job.accepted()

    def status(self, job_id: str) -> bytes:
        """The job as ``JobStatus`` JSON; 404 naming the id when it is unknown or expired."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, "unknown_job",
                               f"job {job_id!r} does not exist or expired (finished jobs are "
                               f"kept {self.ttl_s:g} s); submit the request again")
            head, body = job.head(), job.body
        if body is None:
            return json.dumps({**head, "result": None}).encode()
        return json.dumps(head).encode()[:-1] + b', "result": ' + body + b"}"

    def pending(self) -> int:
        return sum(j.pending for j in self._jobs.values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------
    def _work(self, job: Job, request: Any) -> None:
        with self._lock:
            job.status, job.started = "running", time.time()
        keep = False
        try:
            out = self._run(request)
            body, keep = out if isinstance(out, tuple) else (out, True)
            error = None
        except ApiError as exc:
            body, error = None, exc.body()
        except Exception:  # a bug: keep the board alive; the job says only the request id
            body, error = None, ApiError.internal(f"job {job.job_id}", log).body()
        with self._lock:
            job.body, job.error = body, error
            job.status = "done" if error is None else "failed"
            job.finished = time.time()
            if not keep and self._by_key.get(job.key) == job.job_id:
                del self._by_key[job.key]          # not re-served: the next submit runs again

    def _expire(self) -> None:
        now = time.time()
        done = [j for j in self._jobs.values() if j.finished is not None]
        old = {j.job_id for j in done if now - (j.finished or now) > self.ttl_s}
        old |= {j.job_id for j in done[: max(0, len(done) - self.keep)]}
        for job_id in old:
            job = self._jobs.pop(job_id)
            if self._by_key.get(job.key) == job_id:
                del self._by_key[job.key]
