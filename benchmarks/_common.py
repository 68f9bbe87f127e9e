"""Shared plumbing for the benchmarks: environment, local Ray, machine facts, tables, JSON output.

Usage (from a benchmark script)::

    from _common import setup_env, start_ray, machine, write_json, table

    setup_env()                       # before importing ray: local-only Ray, no usage stats
    start_ray(num_cpus=3)             # ray.init(address="local", include_dashboard=False)
    print(table(rows, ["variant", "median_ms"]))
    write_json("capture_overhead", {...})   # benchmarks/out/capture_overhead-<time>.json
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

OUT = Path(__file__).resolve().parent / "out"
log = logging.getLogger("bench")
WORKER_MECHRAY: dict[str, Any] = {}   # which mechray Ray workers import (filled by start_ray)


def setup_env() -> None:
    """Keep Ray local and quiet; call before ``import ray``."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mechray", "botocore", "boto3", "s3transfer", "urllib3", "werkzeug",
                  "pytorch_lightning", "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_ray(num_cpus: int = 3) -> Any:
    """A local Ray on this machine only (127.0.0.1, no dashboard); returns the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        log.info("local Ray up in %.1fs (num_cpus=%d)", time.perf_counter() - t0, num_cpus)
        check_worker_mechray(ray)
    return ray


def check_worker_mechray(ray) -> None:
    """Ray workers put the driver's working directory first on ``sys.path``: run from the repo
    root they import the repo's ``mechray`` even when the driver imports another copy (a clean
    export on ``PYTHONPATH``).  Record what workers import and warn on a mismatch."""
    import mechray

    @ray.remote(num_cpus=0)
    def where() -> str:
        import mechray as m

        return str(Path(m.__file__).resolve().parent)

    driver = str(Path(mechray.__file__).resolve().parent)
    worker = ray.get(where.remote())
    WORKER_MECHRAY.update(driver=driver, worker=worker, same=driver == worker)
    if driver != worker:
        log.warning("Ray workers import mechray from %s but this process from %s: run from the "
                    "directory that holds the mechray you mean to measure", worker, driver)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (cores, load, versions)."""
    import torch

    info: dict[str, Any] = {
        "host_cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    info["mechray"] = mechray_source()
    if WORKER_MECHRAY:
        info["mechray"]["ray_workers"] = dict(WORKER_MECHRAY)
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    return info


def mechray_source() -> dict[str, Any]:
    """Which mechray was measured: its import path, and the repo's commit and dirty state."""
    import subprocess

    import mechray

    path = Path(mechray.__file__).resolve().parent
    repo = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {"path": str(path), "repo": str(repo)}
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True,  # noqa
                                        text=True, timeout=10).stdout.strip()
        out["repo_head"] = git("rev-parse", "HEAD")
        out["repo_mechray_dirty"] = bool(git("status", "--porcelain", "--", "mechray"))
        out["imported_from_repo"] = path == repo / "mechray"
        # a clean export measured (PYTHONPATH=/tmp/x) names its commit through this variable
        out["measured_commit"] = os.environ.get("MECHRAY_BENCH_COMMIT") or (
            out["repo_head"] if out["imported_from_repo"] and not out["repo_mechray_dirty"]
            else None)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    vals = sorted(values)
    n = len(vals)
    return {"n": n, "median": statistics.median(vals), "mean": statistics.fmean(vals),
            "p10": vals[int(0.10 * (n - 1))], "p90": vals[int(0.90 * (n - 1))],
            "min": vals[0], "max": vals[-1]}


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A small fixed-width text table."""
    rows = list(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(list(columns)), line(["-" * w for w in widths])] +
                     [line(row) for row in cells])


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks write PNGs, no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log2_axes(axes: Iterable[tuple[Any, str]], xlabel: str) -> None:
    """Each ``(axis, ylabel)``: a log2 x axis labelled ``xlabel``, the y label, a light grid."""
    for ax, ylabel in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)


def save_figure(fig: Any, path: Path, title: Optional[str] = None, **title_kw: Any) -> Path:
    """Title, tight layout, ``path`` written at 110 dpi (its folder made), the figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, **title_kw)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_json(name: str, result: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log.info("results written to %s", path)
    return path


class CpuAccount:
    """Where CPU time goes while a block runs (Linux ``/proc``; zeros elsewhere).

    ``snapshot()`` returns cumulative seconds: ``main_run`` (this process's main thread on a CPU),
    ``main_wait`` (main thread runnable but waiting for a CPU: contention with other threads and
    processes), ``threads`` (CPU of this process's other threads), ``children`` (CPU of every
    descendant process: Ray's raylet, GCS and worker/actor processes).  Time the main thread is
    off-CPU by choice (GIL waits, locks, I/O, sleeps) is what is left of the wall time.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = Path(f"/proc/{self.pid}/task/{self.pid}/schedstat").exists()
        self.labels: dict[int, str] = {}   # descendant pid -> what it is (latest seen)

    @staticmethod
    def _label(pid: int) -> str:
        """``ray::ShardWriter``, ``raylet``, ``gcs_server``, ``dashboard.py``, ..."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            return "exited process"
        if not argv:
            return "exited process"
        if argv[0].startswith("ray::"):
            return argv[0].split()[0].split(".")[0]
        name = os.path.basename(argv[0])
        if name.startswith("python"):
            scripts = [os.path.basename(a) for a in argv[1:] if a.endswith(".py")]
            return scripts[0] if scripts else name
        return name

    @staticmethod
    def _stat(path: str) -> list[str]:
        with open(path) as fh:
            return fh.read().rpartition(")")[2].split()

    def _cpu(self, path: str) -> float:
        f = self._stat(path)
        return (int(f[11]) + int(f[12])) / self.tick

    def snapshot(self) -> dict[str, float]:
        if not self.ok:
            return {"main_run": 0.0, "main_wait": 0.0, "threads": 0.0, "children": 0.0}
        with open(f"/proc/{self.pid}/task/{self.pid}/schedstat") as fh:
            run_ns, wait_ns = (int(x) for x in fh.read().split()[:2])
        # the process's CPU counts threads that have exited too; minus the main thread's
        threads = self._cpu(f"/proc/{self.pid}/stat") - self._cpu(
            f"/proc/{self.pid}/task/{self.pid}/stat")
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parent[int(entry)] = int(self._stat(f"/proc/{entry}/stat")[1])
                except (OSError, IndexError, ValueError):
                    pass
        children, frontier, per_pid = 0.0, [self.pid], {}
        while frontier:
            me = frontier.pop()
            for pid, ppid in parent.items():
                if ppid == me:
                    frontier.append(pid)
                    try:
                        per_pid[pid] = self._cpu(f"/proc/{pid}/stat")
                    except (OSError, IndexError, ValueError):
                        continue
                    children += per_pid[pid]
                    label = self._label(pid)
                    if label != "ray::IDLE" or pid not in self.labels:
                        self.labels[pid] = label
        return {"main_run": run_ns / 1e9, "main_wait": wait_ns / 1e9, "threads": threads,
                "children": children, "pids": per_pid}

    @staticmethod
    def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
        out = {k: after[k] - before[k] for k in after if k != "pids"}
        out["pids"] = {pid: cpu - before.get("pids", {}).get(pid, 0.0)
                       for pid, cpu in after.get("pids", {}).items()}
        return out

    def by_label(self, pids: dict[int, float]) -> dict[str, float]:
        """Sum per-pid CPU seconds by what each process is."""
        out: dict[str, float] = {}
        for pid, cpu in pids.items():
            label = self.labels.get(pid, "exited process")
            out[label] = out.get(label, 0.0) + cpu
        return out
