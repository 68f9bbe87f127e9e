"""Starting and stopping ``mechray serve``'s Ray and Serve: on a busy machine, and for good.

Usage::

    from mechray.api.serve_lifecycle import ProcessWatch, readiness_env, start, stop

    os.environ.update(readiness_env())             # before Ray starts: timeouts for this load
    watch = ProcessWatch()                         # this process's Ray, HAProxy... as they come
    start(lambda: ray.init(...), lambda: serve.run(...), teardown, started_ray=True)
    ...
    stop(teardown, watch)                          # bounded; then ends whatever is left

**Busy machines.**  Serve's controller gives its proxy ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``
(Ray's default 5 s) to answer its readiness check and kills it after three misses; on a loaded
2-CPU machine the proxy misses it and ``serve.start`` dies with an ``ActorDiedError`` after
~130 s.  :func:`readiness_env` raises that timeout and the proxy's health-check timeout from
Ray's 5 s / 10 s to 30 s / 60 s, scaled up with the load average per CPU (at most 8x more);
values already in the environment are kept.  They are read by Serve's processes when Ray
starts, so they apply when ``mechray serve`` starts Ray (a cluster it joins keeps its own: set
them before ``ray start``).  :func:`start` tries twice, doubling them in between (Ray is
restarted for that); a second failure is a :class:`ServeStartError`: one line saying what
failed, the load, and the fix.

**Stopping.**  ``kill -TERM -<pgid>`` reaches the driver and the Ray processes in its group at
once; the GCS then dies under Serve's teardown, which waited on it for minutes, and Ray's
workers (each in a process group of its own) left HAProxy behind.  :func:`stop` runs the
teardown with a deadline and ends every process :class:`ProcessWatch` saw descend from this
one (SIGTERM, then SIGKILL after a grace); when the GCS is already gone it ends them first.
``mechray serve`` then leaves with ``os._exit`` so no exit hook waits on the dead GCS.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable, Optional

import psutil

from mechray.errors import MechrayError

log = logging.getLogger(__name__)
READY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": 30.0,     # Ray's default: 5 s
         "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": 60.0}    # Ray's default: 10 s
MAX_LOAD_FACTOR = 8
STOP_S = 20.0                  # the teardown's deadline before processes are ended
GRACE_S = 5.0                  # SIGTERM -> SIGKILL


class ServeStartError(MechrayError, RuntimeError):
    """Serve did not come up (twice); the message says why in one line and what to change."""

    exit_code = 3


def load_factor() -> int:
    """How much busier than idle this machine is: 1 + load average per CPU, 1..MAX."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1
    return max(1, min(MAX_LOAD_FACTOR, math.ceil(1 + load / (os.cpu_count() or 1))))


def readiness_env(environ: Optional[dict[str, str]] = None, factor: Optional[int] = None
                  ) -> dict[str, str]:
    """Serve's proxy readiness and health-check timeouts for this machine's load (see the
    module docstring); variables already set in ``environ`` (default ``os.environ``) are
    left out, so a user's own values win."""
    environ = dict(os.environ if environ is None else environ)
    scale = load_factor() if factor is None else factor
    return {k: f"{v * scale:g}" for k, v in READY.items() if k not in environ}


def start(init: Callable[[], None], run: Callable[[], None], teardown: Callable[[], None], *,
          started_ray: bool, tries: int = 2) -> None:
    """``init()`` (start or join Ray) then ``run()`` (Serve and the app), ``tries`` times;
    between tries ``teardown()`` and, when this process starts Ray, the readiness timeouts
    doubled.  The last failure: :class:`ServeStartError` (one line, the fix)."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            init()
            run()
            return
        except (ray.exceptions.RayError, RuntimeError, TimeoutError) as exc:
            if isinstance(exc, MechrayError):
                raise
            why = _one_line(exc)
            _bounded(teardown, STOP_S)
            if attempt == tries:
                raise ServeStartError(_advice(why, started_ray)) from None
            if started_ray:
                for key in READY:
                    os.environ[key] = f"{float(os.environ.get(key, READY[key])) * 2:g}"
            log.warning("mechray: Serve did not start (%s); retrying with the proxy readiness "
                        "timeout at %s s", why, os.environ.get(next(iter(READY))))


_SLOW = ("ActorDied", "ActorUnavailable", "GetTimeout", "Timeout", "health", "ready",
         "unhealthy", "died")


def _advice(why: str, started_ray: bool) -> str:
    ready = next(iter(READY))
    try:
        load = f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        load = f"{os.cpu_count()} CPUs"
    if not any(word.lower() in why.lower() for word in _SLOW):    # not a missed check: say so
        return (f"Ray Serve did not start twice ({why}; {load}): the application failed to "
                "deploy; the cause is in the log above (a replica's constructor error)")
    fix = (f"raise {ready} (now {os.environ.get(ready, READY[ready])} s) and "
           "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S, or start it when the machine is less busy"
           if started_ray else f"set {ready} higher before `ray start` on the cluster it joins")
    return f"Ray Serve did not start twice ({why}; {load}): {fix}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class ProcessWatch:
    """The processes that descend from this one (Ray's, HAProxy), remembered as they appear so
    that those orphaned when their parent dies can still be ended."""

    def __init__(self) -> None:
        self._seen: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            kids = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for proc in kids:
            self._seen.setdefault(proc.pid, proc)

    def alive(self, name: str) -> bool:
        """Whether a watched process called ``name`` (e.g. ``gcs_server``) still runs."""
        for proc in self._seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and \
                        proc.name() == name:
                    return True
            except psutil.Error:
                continue
        return False

    def end(self, grace_s: float = GRACE_S) -> int:
        """SIGTERM every watched process still running (the same process: pid and start time),
        SIGKILL those left after ``grace_s``; how many there were."""
        left = [p for p in self._seen.values() if _running(p)]
        for proc in left:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, stubborn = psutil.wait_procs(left, timeout=grace_s)
        for proc in stubborn:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(stubborn, timeout=grace_s)
        return len(left)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(teardown: Callable[[], None], watch: Optional[ProcessWatch]) -> None:
    """``teardown()`` within :data:`STOP_S`, then end what ``watch`` saw and is still there."""
    t0, ended = time.monotonic(), 0
    if watch is not None:
        watch.refresh()
        if not watch.alive("gcs_server"):     # the group was signalled: Ray is going down,
            ended = watch.end()               # so end the rest first (HAProxy, workers),
            _bounded(teardown, GRACE_S)       # then let the driver go
            log.info("mechray: stopped in %.1f s (ended %d Ray/HAProxy processes)",
                     time.monotonic() - t0, ended)
            return
    if not _bounded(teardown, STOP_S):
        log.warning("mechray: Ray did not stop within %.0f s; ending its processes", STOP_S)
    if watch is not None:
        ended = watch.end()
    log.info("mechray: stopped in %.1f s (ended %d leftover Ray/HAProxy processes)",
             time.monotonic() - t0, ended)


def _bounded(fn: Callable[[], Any], seconds: float) -> bool:
    """Run ``fn`` in a daemon thread; whether it finished within ``seconds`` (errors logged)."""
    def body() -> None:
        try:
            fn()
        except Exception as exc:  # stopping: say what failed, keep stopping
            log.warning("mechray: %s while stopping", _one_line(exc))

    thread = threading.Thread(target=body, name="mechray-stop", daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()
