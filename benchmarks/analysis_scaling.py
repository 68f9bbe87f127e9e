"""Analysis scaling: neuron stats with 2 Ray workers vs 1 process vs naive; PCA vs scikit-learn;
SAE rows/s from shards vs from an in-memory tensor.  One run, side by side.

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/analysis_scaling.py
    .venv/bin/python benchmarks/analysis_scaling.py --sections neuron --rounds 3
    .venv/bin/python benchmarks/analysis_scaling.py --shards 8 --rows 5000 --sae-rows 8192  # smoke

Data: ``--shards`` shards of ``--rows`` rows of one layer ``lin`` (``d=--d`` float32; defaults
50 x 10000 x 512 = 1.02 GB of activations), written once by the real capture path
(:class:`mechray.ActivationSampler` with writer threads) into ``--cache`` (default
``benchmarks/out/analysis_scaling_cache``, gitignored) and reused while its parameters match.  The
layer is ``relu(Linear(64 -> d))`` of Gaussian inputs: half the values are exact zeros (so
``sparsity`` is not trivial) and the covariance is dominated by 64 directions.

1. **neuron** (``Engine(...).run(["neuron"], layers=["lin"])``, default params), variants
   interleaved over ``--rounds`` rounds (order rotates), median wall per variant:

   ``ray``           Ray on this machine, ``num_cpus=--ray-cpus`` (2): one task per shard,
                     pairwise merge tasks, a finalize task (the engine's plan); workers warmed up
                     on a tiny store first (worker start and imports are not timed)
   ``inproc``        ``use_ray=False``: the same tasks one after another in this process
                     (torch's default intra-op threads, 2 here)
   ``inproc1``       as ``inproc`` with ``torch.set_num_threads(1)``: one core, for context
   ``naive``         ``torch.load(weights_only=True)`` of every shard file whole, then numpy
                     float64 sum / sum of squares / min / max / ``|a| <= eps`` count accumulated
                     per shard -> mean / std / min / max / sparsity
   ``naive_concat``  the same statistics on the concatenated float64 matrix of every row
                     (both naive variants run in a fresh process each, timed inside it: see
                     :class:`NaiveInChild`)

   Every engine run opens the store under a fresh location string, so it verifies every shard's
   sha256 as a fresh ``mechray analyze`` process does (the naive baselines read no checksums);
   shard files are in the page cache after the first pass, so this measures CPU, not disk.
   Aims: ``inproc / ray >= 1.6`` and ``naive / ray >= 2`` (both naive baselines are judged).
   Per variant: CPU of the driver, its threads and its child processes (Ray), user / kernel CPU
   and minor page faults of the process tree, and ``others``, the cores other processes kept
   busy meanwhile.  A per-shard breakdown (sha256, load, each piece of ``neuron.map``, the naive
   ops) says where the time goes (``map``'s pieces as it runs them: blocks, 1 thread).

2. **pca**: the ``feature`` analysis' PCA path through its own API on ``--pca-shards`` shards,
   PCA alone (``n_clusters: 0``): ``map`` per shard (float32 co-moment, one BLAS syrk per block,
   summed in float64), the engine's pairwise merge tree (float64, Chan), then
   ``FeatureAnalysis._pca`` (eigendecomposition).  ``mechray`` is timed on rows already in
   memory (same input as scikit-learn gets), ``mechray_from_shards`` also reads the shards
   (checksum + mmap), ``mechray_float64`` is the path before issue 11 (``precision:
   "float64"``), and ``engine_inproc`` / ``engine_ray`` the user's path
   (``Engine(store).run(["feature"])`` over every shard, in-process or on Ray's workers, each
   shard read and verified: ``--pca-engine``).  Against
   ``sklearn.decomposition.PCA(n_components).fit`` on the concatenated float32 matrix, per solver
   in ``--sklearn-solvers`` (``auto`` picks ``covariance_eigh`` for n >= 10 d, d <= 1000).
   Aim: mechray <= sklearn (auto), explained variance ratios within rtol 1e-5 and components
   equal up to sign (the table gives the largest differences).

3. **sae** (``k``, ``expansion_factor``, ``batch_size`` from the flags, ``epochs=1``,
   ``max_rows=--sae-rows``, ``device=cpu``): ``Engine(..., use_ray=False).run(["sae"])`` over
   the store (``store``: the default ``buffer_mb`` keeps the read rows in memory; ``stream``:
   ``buffer_mb=--sae-stream-buffer-mb`` forces the shuffle-buffer streaming path) against the
   same ``SparseAutoencoder`` + ``SAETrainer`` stepping through an in-memory, pre-shuffled tensor
   of the same number of rows (``memory``).  rows/s of the store variants is the analysis' own
   ``train.rows_per_second`` (its training loop, shard reading included; held-out evaluation
   excluded); the fit's whole wall is reported too, and rows per CPU-second.  All variants use
   ``--sae-threads`` (1) torch threads.  Aim: store / memory >= 0.8.

Output: tables on stdout, JSON at ``--json`` (default ``benchmarks/out/analysis_scaling.json``)
with every sample, the machine, the environment and ``os.getloadavg()`` before and after each
measurement.  Other processes share the cores: numbers are only trustworthy while ``others``
stays near 0 (the 1-minute load average counts this benchmark's own processes too).  Knobs for
the investigation: ``--ray-worker-niceness`` (Ray runs workers at nice 15 by default, so any
nice-0 load starves them) and ``--malloc-mmap-threshold`` (re-runs the script with glibc's
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, which Ray's workers inherit).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, CpuAccount, machine, setup_env, setup_logging, start_ray, table  # noqa: E402

setup_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("bench.analysis_scaling")
LAYER = "lin"
D_IN = 64
_LOCATIONS = [0]   # a counter: every engine run opens the store under a new location string


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_seconds() -> float:
    """CPU seconds all processes on this machine have used (``/proc/stat``; 0 elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)     # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_usage() -> dict[str, float]:
    """user / system CPU seconds and minor page faults of this process and its descendants
    (Ray's workers included), from ``/proc`` (zeros elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    f = fh.read().rpartition(")")[2].split()
                parent[int(entry)], stats[int(entry)] = int(f[1]), f
            except (OSError, IndexError, ValueError):
                pass
    mine, frontier = [os.getpid()], [os.getpid()]
    while frontier:
        me = frontier.pop()
        kids = [pid for pid, pp in parent.items() if pp == me]
        mine += kids
        frontier += kids
    out = {"user_s": 0.0, "sys_s": 0.0, "minor_faults": 0.0}
    for pid in mine:
        f = stats.get(pid)
        if f:
            out["user_s"] += int(f[11]) / tick
            out["sys_s"] += int(f[12]) / tick
            out["minor_faults"] += int(f[7])
    return out


class Others:
    """How many cores *other* processes kept busy while a block ran: the machine's busy CPU
    time minus this process tree's, divided by the wall time (0 = the cores were ours)."""

    def __init__(self, cpu: Optional[CpuAccount] = None):
        self.cpu = cpu or CpuAccount()

    def __enter__(self) -> "Others":
        self.u0 = tree_usage()
        self.t0, self.b0, self.s0 = time.perf_counter(), busy_seconds(), self.cpu.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.ours = CpuAccount.delta(self.cpu.snapshot(), self.s0)
        u1 = tree_usage()
        self.usage = {k: u1[k] - self.u0[k] for k in u1}   # exited processes are not counted
        mine = sum(self.ours[k] for k in ("main_run", "threads", "children"))
        self.cores = max(0.0, busy_seconds() - self.b0 - mine) / max(self.wall, 1e-9)


def fresh_location(root: Path) -> str:
    """The store's path spelt differently each call (``dir``, ``dir/``, ``dir//`` ...): the engine
    and its workers cache opened stores (and verified checksums) per location string, so a new
    spelling makes every run verify every shard as a fresh process would."""
    _LOCATIONS[0] += 1
    return str(root) + "/" * _LOCATIONS[0]


# --- data ---------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self, d: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Sequential(torch.nn.Linear(D_IN, d), torch.nn.ReLU())

    def forward(self, x):
        return self.lin(x)


def ensure_store(root: Path, shards: int, rows: int, d: int, seed: int) -> tuple[Path, dict]:
    """The store at ``root`` with these sizes: reused when its manifest matches, else written."""
    from mechray import ActivationSampler, ShardStore

    want = {"shards": shards, "rows": rows, "d": d, "seed": seed, "layer": LAYER}
    marker = root / "bench_params.json"
    if marker.is_file():
        try:
            info = ShardStore(root).layers()[LAYER]
            if json.loads(marker.read_text()) == want and info["shards"] == shards and \
                    info["rows"] == shards * rows and info["feature_shape"] == [d]:
                log.info("reusing %s (%d shards x %d rows x d=%d)", root, shards, rows, d)
                return root, {"generated": False, "seconds": 0.0}
        except Exception as exc:  # unreadable or partial: rewrite it
            log.info("cache at %s unusable (%s): rewriting it", root, exc)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    model = Toy(d, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    sampler = ActivationSampler(layers=[LAYER], save_dir=str(root), use_ray=False,
                                max_activations_per_shard=rows, verbose=False)
    sampler.register_hooks(model)
    with torch.no_grad():
        for i in tqdm(range(shards), desc=f"writing {root.name}", unit="shard", file=sys.stderr,
                      disable=shards < 8):
            sampler.current_step = 10 * i
            model(torch.randn(rows, D_IN, generator=gen))
            sampler.save_activations(10 * i)
    sampler.close()
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps(want))
    nbytes = sum(p.stat().st_size for p in root.glob("*.pt"))
    log.info("wrote %s: %d shards, %.2f GB in %.1fs", root, shards, nbytes / 1e9, seconds)
    return root, {"generated": True, "seconds": seconds}


def store_facts(root: Path) -> dict[str, Any]:
    from mechray import ShardStore

    store = ShardStore(root)
    info = store.layers()[LAYER]
    files = store.shards(LAYER)
    return {"path": str(root), "shards": len(files), "rows": info["rows"],
            "d": info["feature_shape"][0], "dtype": info["dtype"],
            "activation_bytes": info["rows"] * info["feature_shape"][0] * 4,
            "file_bytes": sum(e["bytes"] for e in files)}


# --- 1. neuron ----------------------------------------------------------------------------------
def naive_neuron(root: Path, mode: str, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """What users write first: load every shard whole, numpy float64 statistics."""
    files = sorted(root.glob("activations_*.pt"))
    if mode == "concat":
        parts = [torch.load(f, weights_only=True)["activations"][LAYER].numpy() for f in files]
        x = np.concatenate(parts).astype(np.float64)
        del parts
        return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
                "sparsity": (np.abs(x) <= eps).mean(0)}
    n, s, ss, mn, mx, small = 0, 0.0, 0.0, None, None, 0
    for f in files:
        x = torch.load(f, weights_only=True)["activations"][LAYER].numpy().astype(np.float64)
        n += len(x)
        s = s + x.sum(0)
        ss = ss + np.einsum("ij,ij->j", x, x)
        mn = x.min(0) if mn is None else np.minimum(mn, x.min(0))
        mx = x.max(0) if mx is None else np.maximum(mx, x.max(0))
        small = small + (np.abs(x) <= eps).sum(0)
    mean = s / n
    return {"mean": mean, "std": np.sqrt(np.maximum(ss / n - mean ** 2, 0.0)), "min": mn,
            "max": mx, "sparsity": small / n}


def _naive_child(root: str, mode: str) -> dict[str, Any]:
    """``naive_neuron`` timed inside a fresh process (see :func:`naive_in_child`)."""
    import resource

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = naive_neuron(Path(root), mode)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"output": out, "seconds": wall, "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}


def _ready() -> int:
    return os.getpid()


class NaiveInChild:
    """Runs a naive baseline in a fresh process, timed there.

    Why: ``naive_concat`` leaves ~1 GB of freed, already-faulted heap in the process behind it,
    and later in-process engine runs then reuse it and skip ~6 M page faults (half their time):
    the engine variants' numbers would depend on which variant ran before them.  ``prepare``
    starts the process (interpreter and imports, untimed); the call runs the baseline in it."""

    def __init__(self, root: Path, mode: str):
        self.root, self.mode, self.pool = root, mode, None

    def prepare(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.pool.submit(_ready).result()

    def __call__(self) -> tuple[dict, dict]:
        got = self.pool.submit(_naive_child, str(self.root), self.mode).result()
        return got.pop("output"), got

    def done(self) -> None:
        self.pool.shutdown()
        self.pool = None


def engine_neuron(root: Path, use_ray: bool) -> dict[str, Any]:
    from mechray.analysis.engine import Engine

    return Engine(fresh_location(root), use_ray=use_ray, progress=False).run(
        ["neuron"], layers=[LAYER])["neuron"][LAYER]


def run_neuron(args, root: Path, warm_root: Path) -> dict[str, Any]:
    variants: dict[str, Callable[[], Any]] = {}
    threads = torch.get_num_threads()

    def inproc1():
        torch.set_num_threads(1)
        try:
            return engine_neuron(root, False)
        finally:
            torch.set_num_threads(threads)

    for v in args.variants:
        if v == "ray":
            ray = start_ray(args.ray_cpus)
            t0 = time.perf_counter()
            engine_neuron(warm_root, True)   # workers start, import torch/mechray, get functions
            ray_workers = ray_worker_facts(ray, args.ray_cpus)
            log.info("Ray workers warmed up in %.1fs (%s CPUs in the cluster): %s",
                     time.perf_counter() - t0, ray.cluster_resources().get("CPU"), ray_workers)
            variants[v] = lambda: engine_neuron(root, True)
        elif v == "inproc":
            variants[v] = lambda: engine_neuron(root, False)
        elif v == "inproc1":
            variants[v] = inproc1
        elif v == "naive":
            variants[v] = NaiveInChild(root, "accumulate")
        elif v == "naive_concat":
            variants[v] = NaiveInChild(root, "concat")
        else:
            raise SystemExit(f"unknown variant {v!r}; use ray, inproc, inproc1, naive, "
                             "naive_concat")
    if {"inproc", "inproc1"} & set(variants):
        engine_neuron(warm_root, False)    # imports and first calls, untimed
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    outputs: dict[str, Any] = {}
    cpu = CpuAccount()
    order = list(variants)
    with tqdm(total=args.rounds * len(order), desc="neuron", unit="run", file=sys.stderr) as bar:
        for r in range(args.rounds):
            rot = r % len(order)
            for v in order[rot:] + order[:rot]:
                gc.collect()
                if hasattr(variants[v], "prepare"):
                    variants[v].prepare()
                l0 = load()
                with Others(cpu) as o:
                    outputs[v] = variants[v]()
                if hasattr(variants[v], "done"):
                    variants[v].done()
                child: dict[str, float] = {}
                if isinstance(outputs[v], tuple):    # (output, what the child process measured)
                    outputs[v], child = outputs[v]
                wall, d = child.get("seconds", o.wall), dict(o.ours)
                by_process = {k: round(x, 2) for k, x in cpu.by_label(d.pop("pids")).items()
                              if x >= 0.05}
                samples[v].append({"seconds": wall, "round": r, "load_before": l0,
                                   "load_after": load(), "others_cores": o.cores,
                                   **{**o.usage, **child},
                                   **{f"cpu_{k}": x for k, x in d.items()},
                                   "child_cpu_by_process": by_process})
                bar.set_postfix_str(f"{v} {wall:.1f}s")
                bar.update(1)
    res: dict[str, Any] = {"variants": {}, "check": check_neuron(outputs)}
    if "ray" in variants:
        res["ray_workers"] = ray_workers
    for v, ss in samples.items():
        med = statistics.median(s["seconds"] for s in ss)
        res["variants"][v] = {"median_seconds": med, "samples": ss,
                              "gb_per_s": args.facts["activation_bytes"] / med / 1e9,
                              "rows_per_s": args.facts["rows"] / med}
    med = {v: x["median_seconds"] for v, x in res["variants"].items()}
    if "ray" in med:
        if "inproc" in med:
            res["inproc_over_ray"] = med["inproc"] / med["ray"]
        if "inproc1" in med:
            res["inproc1_over_ray"] = med["inproc1"] / med["ray"]
        if "naive" in med:
            res["naive_over_ray"] = med["naive"] / med["ray"]
        if "naive_concat" in med:
            res["naive_concat_over_ray"] = med["naive_concat"] / med["ray"]
    if "naive" in med and "inproc" in med:
        res["naive_over_inproc"] = med["naive"] / med["inproc"]
    # the same ratios from each variant's fastest run, and from the runs during which other
    # processes kept less than --quiet cores busy (None when a variant had no such run)
    best = {v: min(s["seconds"] for s in ss) for v, ss in samples.items()}
    quiet = {v: [s["seconds"] for s in ss if s["others_cores"] < args.quiet]
             for v, ss in samples.items()}
    for v, q in quiet.items():
        res["variants"][v]["quiet_runs"] = len(q)
        res["variants"][v]["quiet_median_seconds"] = statistics.median(q) if q else None
    if "ray" in best:
        res["best_of_runs"] = {f"{v}_over_ray": best[v] / best["ray"] for v in best if v != "ray"}
        if quiet["ray"]:
            qr = statistics.median(quiet["ray"])
            res["quiet_runs"] = {f"{v}_over_ray": statistics.median(q) / qr
                                 for v, q in quiet.items() if v != "ray" and q}
    res["breakdown_ms_per_shard"] = breakdown(root, args.breakdown_shards)
    return res


def ray_worker_facts(ray, n: int) -> list[dict[str, Any]]:
    """Niceness and thread settings of the Ray worker processes (one probe per CPU slot)."""
    @ray.remote(num_cpus=1)
    def probe():
        time.sleep(0.3)   # hold the slot so each probe lands in a different worker
        return {"pid": os.getpid(), "niceness": os.nice(0),
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    return ray.get([probe.remote() for _ in range(n)])


def check_neuron(outputs: dict[str, Any]) -> dict[str, Any]:
    """The engine's numbers against the naive float64 ones (and Ray against in-process)."""
    out: dict[str, Any] = {}
    ref = outputs.get("naive", outputs.get("naive_concat"))
    for v, o in outputs.items():
        if v.startswith("naive") or not isinstance(o, dict) or "mean" not in o:
            continue
        if ref is not None:
            out[f"{v}_vs_naive_max_abs_diff"] = {
                k: float(np.max(np.abs(np.asarray(o[k]) - ref[k])))
                for k in ("mean", "std", "min", "max", "sparsity")}
        if v != "inproc" and isinstance(outputs.get("inproc"), dict):
            out[f"{v}_equals_inproc"] = o == outputs["inproc"]
    return out


def breakdown(root: Path, n_shards: int) -> dict[str, Any]:
    """Per-shard cost of each step the variants take (median over ``n_shards`` shards, ms),
    with ``neuron.map``'s pieces as it runs them (blocks of ``BLOCK_BYTES``, 1 thread)."""
    import resource

    from mechray import ShardStore
    from mechray.analysis import get_analysis
    from mechray.analysis import neuron as nmod

    store = ShardStore(fresh_location(root))
    neuron = get_analysis("neuron")
    eps, k = neuron.params.eps, neuron.params.top_k
    entries = store.shards(LAYER)[:n_shards]
    threads = torch.get_num_threads()
    parts: dict[str, list[float]] = {}
    faults: dict[str, list[tuple[float, float]]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.setdefault(name, []).append(((r1.ru_stime - r0.ru_stime) * 1e3,
                                            r1.ru_minflt - r0.ru_minflt))
        return out

    for e in entries:
        path = store.root / e["file"]

        def sha():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
        timed("sha256 of the file", sha)
        rows = timed("store.load (verify + mmap)", lambda: store.load(e)["activations"][LAYER])
        timed("first touch of the mmap rows (sum)", lambda: float(rows.sum()))
        timed("torch.load whole (naive)", lambda: torch.load(path, weights_only=True))
        entry = dict(e, row_steps=None)
        timed(f"neuron.map, {threads} torch threads", lambda: neuron.map(rows, entry, LAYER))
        torch.set_num_threads(1)
        try:   # one thread from here: as in a Ray worker
            timed("neuron.map, 1 thread", lambda: neuron.map(rows, entry, LAYER))
            xn = rows.numpy()
            step = max(64, nmod.BLOCK_BYTES // (4 * xn.shape[1])) // nmod.GROUP * nmod.GROUP
            blocks = [xn[i:i + step] for i in range(0, len(xn), step)]
            e32 = nmod._eps_for(xn.dtype, eps)

            def moments():
                for b in blocks:
                    y = b.astype(np.float64)
                    y -= y.mean(0)
                    np.einsum("ij,ij->j", y, y)
            def group_maxima():
                return [torch.amax(torch.from_numpy(b[:len(b) - len(b) % nmod.GROUP]).reshape(
                    -1, nmod.GROUP, b.shape[1]), dim=1) for b in blocks if len(b) >= nmod.GROUP]
            gmax = torch.cat(group_maxima())
            timed("  map: 16-row group maxima per block", group_maxima)
            timed(f"  map: top-{k} from the group maxima (whole shard, ties checked)",
                  lambda: nmod._topk_rows(rows, k, gmax))
            timed("  map: float64 mean + m2 per block", moments)
            timed("  map: |x|<=eps and x>0 counts (float32)",
                  lambda: [(nmod._count(np.abs(b) <= e32), nmod._count(b > 0)) for b in blocks])

            def histogram():
                keys = nmod._HistKeys(len(blocks[0]) * xn.shape[1])
                for b in blocks:
                    keys.add(b)
                return keys.histogram()
            timed("  map: histogram (16-bit key counts per block)", histogram)
            timed("  map: min + max per block",
                  lambda: [(b.min(0), b.max(0)) for b in blocks])

            def naive_ops():
                y = xn.astype(np.float64)
                return (y.sum(0), np.einsum("ij,ij->j", y, y), y.min(0), y.max(0),
                        (np.abs(y) <= eps).sum(0))
            timed("naive numpy ops (float64), 1 thread", naive_ops)
        finally:
            torch.set_num_threads(threads)
    out: dict[str, Any] = {name: statistics.median(v) for name, v in parts.items()}
    out["kernel_ms_and_minor_faults"] = {
        name: [statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)]
        for name, v in faults.items()}
    return out


# --- 2. PCA -------------------------------------------------------------------------------------
def run_pca(args, root: Path) -> dict[str, Any]:
    from sklearn.decomposition import PCA

    from mechray import ShardStore
    from mechray.analysis import get_analysis
    from mechray.analysis.base import Context
    from mechray.analysis.engine import Engine
    from mechray.analysis.tasks import tree as _tree

    store = ShardStore(fresh_location(root))
    entries = store.shards(LAYER)[: args.pca_shards]
    rows = [store.load(e)["activations"][LAYER].clone() for e in entries]
    X = torch.cat(rows).numpy()
    del rows
    slices = [torch.from_numpy(X[i:i + args.rows]) for i in range(0, len(X), args.rows)]
    # PCA alone (n_clusters=0: no k-means, no silhouette sample), as scikit-learn's PCA does
    feature = get_analysis("feature", {"n_components": args.n_components, "n_clusters": 0})
    feature64 = get_analysis("feature", {"n_components": args.n_components, "n_clusters": 0,
                                         "precision": "float64"})
    ctx = Context(store=None)

    def mechray_in_memory() -> tuple[dict, dict]:
        t = {}
        t0 = time.perf_counter()
        parts = [feature.map(s, e, LAYER) for s, e in zip(slices, entries)]
        t["map"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        root_part = _tree(parts, feature.merge, fan_in=2)
        t["merge"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = feature._pca(root_part, ctx, LAYER)
        t["eigh"] = time.perf_counter() - t0
        return out, t

    def mechray_from_shards() -> tuple[dict, dict]:
        st = ShardStore(fresh_location(root))
        t0 = time.perf_counter()
        parts = [feature.map(r, e, LAYER) for e, r in
                 zip(entries, (st.load(e)["activations"][LAYER] for e in entries))]
        t = {"read+map": time.perf_counter() - t0}
        t0 = time.perf_counter()
        out = feature._pca(_tree(parts, feature.merge, fan_in=2), ctx, LAYER)
        t["merge+eigh"] = time.perf_counter() - t0
        return out, t

    def mechray_float64() -> tuple[dict, dict]:
        """The co-moment as before issue 11 (``precision: float64``), rows in memory."""
        t0 = time.perf_counter()
        parts = [feature64.map(s, e, LAYER) for s, e in zip(slices, entries)]
        t = {"map": time.perf_counter() - t0}
        t0 = time.perf_counter()
        out = feature64._pca(_tree(parts, feature64.merge, fan_in=2), ctx, LAYER)
        t["merge+eigh"] = time.perf_counter() - t0
        return out, t

    def sklearn(solver: str) -> Callable[[], tuple[dict, dict]]:
        def fit():
            pca = PCA(n_components=args.n_components, svd_solver=solver, random_state=0)
            pca.fit(X)
            return {"explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
                    "components": pca.components_,
                    "solver": getattr(pca, "_fit_svd_solver", solver)}, {}
        return fit

    def engine(use_ray: bool) -> Callable[[], tuple[dict, dict]]:
        """The user's path: ``Engine(store).run(["feature"])`` over every shard of the store,
        reads and checksums included, in-process or on Ray's workers."""
        def go():
            out = Engine(fresh_location(root), use_ray=use_ray, progress=False).run(
                ["feature"], {"feature": {"n_components": args.n_components, "n_clusters": 0}},
                layers=[LAYER])["feature"][LAYER]
            if "explained_variance_ratio" not in out:
                raise RuntimeError(f"feature failed: {out}")
            return out, {}
        return go

    methods: dict[str, Callable] = {"mechray": mechray_in_memory,
                                    "mechray_from_shards": mechray_from_shards,
                                    "mechray_float64": mechray_float64}
    engines = [v for v in args.pca_engine.split(",") if v]
    if engines and len(entries) < len(store.shards(LAYER)):
        log.info("--pca-engine skipped: the Engine reads every shard, --pca-shards fewer")
        engines = []
    for v in engines:
        if v not in ("inproc", "ray"):
            raise SystemExit(f"--pca-engine {v!r}: use inproc and/or ray")
        if v == "ray":
            start_ray(args.ray_cpus)
        methods[f"engine_{v}"] = engine(v == "ray")
        methods[f"engine_{v}"]()                      # warm: Ray workers start, imports
    for s in args.sklearn_solvers:
        methods[f"sklearn_{s}"] = sklearn(s)
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    outs: dict[str, dict] = {}
    order = list(methods)
    with tqdm(total=args.pca_rounds * len(order), desc="pca", unit="fit", file=sys.stderr) as bar:
        for r in range(args.pca_rounds):
            rot = r % len(order)
            for m in order[rot:] + order[:rot]:
                gc.collect()
                l0 = load()
                with Others() as o:
                    outs[m], parts = methods[m]()
                samples[m].append({"seconds": o.wall, "parts": parts, "load_before": l0,
                                   "load_after": load(), "others_cores": o.cores, **o.usage})
                wall = o.wall
                bar.set_postfix_str(f"{m} {wall:.1f}s")
                bar.update(1)
    res: dict[str, Any] = {"rows": int(len(X)), "d": int(X.shape[1]),
                           "n_components": args.n_components, "methods": {}}
    ref_key = "sklearn_auto" if "sklearn_auto" in outs else next(
        (m for m in outs if m.startswith("sklearn")), None)
    for m, ss in samples.items():
        res["methods"][m] = {"median_seconds": statistics.median(s["seconds"] for s in ss),
                             "samples": ss}
        if m.startswith("sklearn"):
            res["methods"][m]["solver_used"] = outs[m]["solver"]
    if ref_key:
        ref = outs[ref_key]
        ref_t = res["methods"][ref_key]["median_seconds"]
        for m, o in outs.items():
            evr = np.asarray(o["explained_variance_ratio"])
            comps = np.asarray(o["components"]) if "components" in o else None
            info = res["methods"][m]
            info["over_" + ref_key] = info["median_seconds"] / ref_t
            want = np.asarray(ref["explained_variance_ratio"])
            info["evr_max_abs_diff_vs_" + ref_key] = float(np.max(np.abs(evr - want)))
            info["evr_max_rel_diff_vs_" + ref_key] = float(np.max(np.abs(evr - want) / want))
            if comps is not None:
                cos = np.abs(np.sum(comps * ref["components"], axis=1))
                info["min_abs_cos_vs_" + ref_key] = float(cos.min())
                sign = np.sign(np.sum(comps * ref["components"], axis=1))[:, None]
                info["comp_max_abs_diff_vs_" + ref_key] = float(
                    np.max(np.abs(comps * sign - ref["components"])))
    res["flops_note"] = ("X^T X is 2*n*d^2 = %.0f GFLOP; mechray does it in float32 syrk "
                         "blocks per shard merged in float64 (mechray_float64: float64), "
                         "scikit-learn's covariance_eigh in the input's float32" %
                         (2 * len(X) * X.shape[1] ** 2 / 1e9))
    res["gemm_probe_seconds"] = gemm_probe(slices[0])
    if "mechray" in outs and "mechray_float64" in outs:
        a, b = outs["mechray"], outs["mechray_float64"]
        res["float32_vs_float64_evr_max_rel_diff"] = float(np.max(np.abs(
            np.asarray(a["explained_variance_ratio"]) / np.asarray(b["explained_variance_ratio"])
            - 1)))
    X = slices = None      # free the rows before the next section (the closures above hold cells)
    gc.collect()
    return res


def gemm_probe(x32: torch.Tensor) -> dict[str, float]:
    """One shard's co-moment, in the ways it could be computed (seconds, median of 3)."""
    def t(fn):
        vals = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            vals.append(time.perf_counter() - t0)
        return statistics.median(vals)
    x64 = x32.to(torch.float64)
    xc64 = x64 - x64.mean(0)
    xc32 = (x32 - x32.mean(0))
    xn, xc64n, xc32n = x32.numpy(), xc64.numpy(), xc32.numpy()
    return {"to_float64": t(lambda: x32.to(torch.float64)),
            "center_float64": t(lambda: x64 - x64.mean(0)),
            "torch f64 xc.T @ xc (mechray)": t(lambda: xc64.T @ xc64),
            "torch f32 xc.T @ xc": t(lambda: xc32.T @ xc32),
            "numpy f64 xc.T @ xc (syrk)": t(lambda: xc64n.T @ xc64n),
            "numpy f32 xc.T @ xc (syrk)": t(lambda: xc32n.T @ xc32n),
            "numpy f32 X.T @ X (sklearn's op)": t(lambda: xn.T @ xn)}


# --- 3. SAE -------------------------------------------------------------------------------------
def sae_params(args, buffer_mb: Optional[float] = None) -> dict[str, Any]:
    p = {"k": args.sae_k, "expansion_factor": args.sae_expansion, "epochs": 1,
         "batch_size": args.sae_batch, "max_rows": args.sae_rows, "device": "cpu",
         "save_weights": False, "seed": 0}
    if buffer_mb is not None:
        p["buffer_mb"] = buffer_mb
    return p


def run_sae(args, root: Path) -> dict[str, Any]:
    from mechray import ShardStore
    from mechray.analysis import get_analysis
    from mechray.analysis.engine import Engine
    from mechray.analysis.sae.model import SparseAutoencoder
    from mechray.analysis.sae.train import SAETrainer

    def from_store(buffer_mb: Optional[float]) -> Callable[[], dict]:
        def go():
            t0, c0 = time.perf_counter(), time.process_time()
            out = Engine(fresh_location(root), use_ray=False, progress=False).run(
                ["sae"], {"sae": sae_params(args, buffer_mb)}, layers=[LAYER])["sae"][LAYER]
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if out.get("skipped"):
                raise RuntimeError(f"sae skipped: {out}")
            tr = out["train"]
            return {"rows": tr["rows_seen"], "steps": tr["steps"], "train_seconds": tr["seconds"],
                    "rows_per_s": tr["rows_per_second"], "fit_wall_seconds": wall,
                    "rows_per_s_fit_wall": tr["rows_seen"] / wall, "fit_cpu_seconds": cpu,
                    "rows_per_cpu_s": tr["rows_seen"] / cpu, "in_memory": tr["in_memory"],
                    "explained_variance": out["explained_variance"], "l0": out["l0"]}
        return go

    # the in-memory tensor: the same number of training rows, read once, shuffled once
    p = get_analysis("sae", sae_params(args)).params
    store = ShardStore(fresh_location(root))
    X = store.read_layer(LAYER, max_rows=p.max_rows)
    X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(1))].contiguous()
    d = X.shape[1]
    n_latents = p.expansion_factor * d
    lr = p.lr or min(1e-2, 2e-4 / math.sqrt(n_latents / 16384))
    aux_k = min(d // 2 if p.aux_k is None else p.aux_k, n_latents)

    def in_memory() -> dict:
        gen = torch.Generator().manual_seed(p.seed)
        sae = SparseAutoencoder(d, n_latents, p.architecture, p.k, generator=gen)
        steps = math.ceil(len(X) / p.batch_size)
        trainer = SAETrainer(sae, lr, p.l1_coefficient, aux_k, p.aux_coefficient,
                             p.dead_steps_threshold, total_steps=steps)
        t0, c0 = time.perf_counter(), time.process_time()
        sae.init_from_data(X[:65536], p.normalize_input, p.b_dec_init)
        for i in range(0, len(X), p.batch_size):
            trainer.step(X[i:i + p.batch_size])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"rows": len(X), "steps": trainer.n_steps, "train_seconds": seconds,
                "rows_per_s": len(X) / seconds, "train_cpu_seconds": cpu,
                "rows_per_cpu_s": len(X) / cpu}

    variants = {"store": from_store(None), "stream": from_store(args.sae_stream_buffer_mb),
                "memory": in_memory}
    variants = {k: v for k, v in variants.items() if k in args.sae_variants}
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    order = list(variants)
    threads = torch.get_num_threads()
    if args.sae_threads:
        torch.set_num_threads(args.sae_threads)
    try:
        with tqdm(total=args.sae_rounds * len(order), desc="sae", unit="fit",
                  file=sys.stderr) as bar:
            for r in range(args.sae_rounds):
                rot = r % len(order)
                for v in order[rot:] + order[:rot]:
                    gc.collect()
                    l0 = load()
                    with Others() as o:
                        s = variants[v]()
                    samples[v].append({**s, "load_before": l0, "load_after": load(),
                                       "others_cores": o.cores})
                    bar.set_postfix_str(f"{v} {s['rows_per_s']:.0f} rows/s")
                    bar.update(1)
    finally:
        sae_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    res: dict[str, Any] = {"params": sae_params(args), "n_latents": n_latents, "d": d,
                           "torch_threads": sae_threads,
                           "stream_buffer_mb": args.sae_stream_buffer_mb, "variants": {}}
    for v, ss in samples.items():
        res["variants"][v] = {"median_rows_per_s": statistics.median(s["rows_per_s"] for s in ss),
                              "best_rows_per_s": max(s["rows_per_s"] for s in ss),
                              "median_rows_per_cpu_s": statistics.median(
                                  s["rows_per_cpu_s"] for s in ss),
                              "samples": ss}
        if "rows_per_s_fit_wall" in ss[0]:
            res["variants"][v]["median_rows_per_s_fit_wall"] = statistics.median(
                s["rows_per_s_fit_wall"] for s in ss)
    mem = res["variants"].get("memory")
    if mem:
        for v in ("store", "stream"):
            if v in res["variants"]:
                r = res["variants"][v]
                res[f"{v}_over_memory"] = r["median_rows_per_s"] / mem["median_rows_per_s"]
                res[f"{v}_over_memory_best"] = r["best_rows_per_s"] / mem["best_rows_per_s"]
                # per CPU-second of this process: insensitive to other processes; the store
                # variant's CPU includes its held-out evaluation (a conservative ratio)
                res[f"{v}_over_memory_cpu"] = r["median_rows_per_cpu_s"] / \
                    mem["median_rows_per_cpu_s"]
    return res


# --- report -------------------------------------------------------------------------------------
def _sci(v: Optional[float], fmt: str = "%.1e") -> Optional[str]:
    return None if v is None else fmt % v


def report(args, out: dict[str, Any]) -> dict[str, bool]:
    aims: dict[str, bool] = {}
    f = out["store"]
    print()
    print(f"store: {f['shards']} shards x {f['rows'] // max(f['shards'], 1)} rows x d={f['d']} "
          f"{f['dtype']} = {f['activation_bytes'] / 1e9:.2f} GB of activations "
          f"({f['file_bytes'] / 1e9:.2f} GB of files); torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    if "neuron" in out:
        n = out["neuron"]
        desc = {"ray": f"Engine use_ray=True, {args.ray_cpus} workers",
                "inproc": f"Engine use_ray=False ({torch.get_num_threads()} torch threads)",
                "inproc1": "Engine use_ray=False, 1 torch thread",
                "naive": "torch.load whole + numpy float64, per shard",
                "naive_concat": "torch.load whole + numpy float64, concatenated"}
        rows = []
        for v, r in n["variants"].items():
            ss = r["samples"]
            rows.append({"variant": v, "what": desc[v], "median_s": r["median_seconds"],
                         "min_s": min(s["seconds"] for s in ss),
                         "max_s": max(s["seconds"] for s in ss),
                         "GB/s": r["gb_per_s"],
                         "cpu_s_main": statistics.median(s["cpu_main_run"] for s in ss),
                         "cpu_s_threads": max(0.0, statistics.median(s["cpu_threads"] for s in ss)),
                         "cpu_s_children": statistics.median(s["cpu_children"] for s in ss),
                         "wait_cpu_s": statistics.median(s["cpu_main_wait"] for s in ss),
                         "user_s": statistics.median(s["user_s"] for s in ss),
                         "sys_s": statistics.median(s["sys_s"] for s in ss),
                         "faults_M": statistics.median(s["minor_faults"] for s in ss) / 1e6,
                         "others": statistics.median(s["others_cores"] for s in ss),
                         "load1": statistics.median(s["load_before"][0] for s in ss)})
        print(f"\n1. neuron stats, {args.rounds} rounds (median; cpu_s_children = Ray processes; "
              "wait_cpu_s = driver runnable but waiting for a core; user_s / sys_s / faults_M = "
              "user and kernel CPU seconds and millions of minor page faults of this process "
              "tree; others = cores other processes kept busy meanwhile; load1 counts this "
              "benchmark too)")
        print(table(rows, ["variant", "median_s", "min_s", "max_s", "GB/s", "cpu_s_main",
                           "cpu_s_threads", "cpu_s_children", "wait_cpu_s", "user_s", "sys_s",
                           "faults_M", "others", "load1"]))
        print("   " + "; ".join(f"{r['variant']}: {r['what']}" for r in rows))
        if "ray" in n["variants"]:
            by = n["variants"]["ray"]["samples"][-1]["child_cpu_by_process"]
            print("   ray, last run, CPU seconds by process: " + ", ".join(
                f"{k} {x:.1f}" for k, x in sorted(by.items(), key=lambda kv: -kv[1])))
        for key, aim in (("inproc_over_ray", 1.6), ("naive_over_ray", 2.0),
                         ("naive_concat_over_ray", 2.0)):
            if key in n:
                aims[f"{key}>={aim}"] = n[key] >= aim
                print(f"   {key.replace('_over_', ' / ')} = {n[key]:.2f}x  (aim >= {aim}x: "
                      f"{'met' if n[key] >= aim else 'MISSED'})")
        for key in ("inproc1_over_ray", "naive_over_inproc"):
            if key in n:
                print(f"   {key.replace('_over_', ' / ')} = {n[key]:.2f}x")
        if "best_of_runs" in n:
            print("   from each variant's fastest run: " + ", ".join(
                f"{k.replace('_over_', ' / ')} = {x:.2f}x" for k, x in n["best_of_runs"].items()))
        if n.get("quiet_runs"):
            print(f"   from runs with others < {args.quiet} cores: " + ", ".join(
                f"{k.replace('_over_', ' / ')} = {x:.2f}x" for k, x in n["quiet_runs"].items())
                + " (" + ", ".join(f"{v} {r['quiet_runs']}/{len(r['samples'])}"
                                   for v, r in n["variants"].items()) + " runs quiet)")
        if "ray_workers" in n:
            print("   Ray workers: " + "; ".join(
                f"pid {w['pid']} nice {w['niceness']} torch threads {w['torch_threads']}"
                for w in n["ray_workers"]))
        for k, v in n["check"].items():
            print(f"   check {k}: {v}")
        b = n["breakdown_ms_per_shard"]
        print("   per-shard breakdown, this process (median over %d shards): wall ms, of which "
              "kernel ms, minor page faults" % args.breakdown_shards)
        for k, v in b.items():
            if isinstance(v, float):
                ks, mf = b["kernel_ms_and_minor_faults"][k]
                print(f"     {k:48s} {v:8.1f} {ks:8.1f} {mf:9.0f}")
    if "pca" in out:
        p = out["pca"]
        rows = []
        for m, r in p["methods"].items():
            parts = r["samples"][-1]["parts"]
            rows.append({"method": m + (f" ({r['solver_used']})" if "solver_used" in r else ""),
                         "median_s": r["median_seconds"],
                         "x_vs_sklearn_auto": r.get("over_sklearn_auto"),
                         "evr_rel_diff": _sci(r.get("evr_max_rel_diff_vs_sklearn_auto")),
                         "comp_diff": _sci(r.get("comp_max_abs_diff_vs_sklearn_auto")),
                         "min_cos": _sci(r.get("min_abs_cos_vs_sklearn_auto"), "%.9f"),
                         "parts_s": ", ".join(f"{k} {x:.2f}" for k, x in parts.items()),
                         "sys_s": statistics.median(s["sys_s"] for s in r["samples"]),
                         "faults_M": statistics.median(s["minor_faults"] for s in r["samples"])
                         / 1e6,
                         "others": statistics.median(s["others_cores"] for s in r["samples"]),
                         "load1": statistics.median(s["load_before"][0] for s in r["samples"])})
        print(f"\n2. PCA, {p['rows']} rows x d={p['d']}, n_components={p['n_components']}, "
              f"{args.pca_rounds} rounds ({p['flops_note']})")
        print(table(rows, ["method", "median_s", "x_vs_sklearn_auto", "evr_rel_diff", "comp_diff",
                           "min_cos",
                           "parts_s", "sys_s", "faults_M", "others", "load1"]))
        if "mechray" in p["methods"] and "over_sklearn_auto" in p["methods"]["mechray"]:
            x = p["methods"]["mechray"]["over_sklearn_auto"]
            aims["pca_mechray/sklearn<=1"] = x <= 1.0
            print(f"   mechray / sklearn(auto) = {x:.2f}  (aim <= 1: "
                  f"{'met' if x <= 1 else 'MISSED'})")
        print("   one shard's co-moment (s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in p["gemm_probe_seconds"].items()))
    if "cluster" in out:
        from _cluster_scaling import report as cluster_report

        cluster_report(args, out["cluster"])
    if "sae" in out:
        s = out["sae"]
        rows = []
        for v, r in s["variants"].items():
            ss = r["samples"]
            rows.append({"variant": v, "rows": ss[0]["rows"], "steps": ss[0]["steps"],
                         "rows_per_s": r["median_rows_per_s"],
                         "best_rows_per_s": r["best_rows_per_s"],
                         "rows_per_cpu_s": r["median_rows_per_cpu_s"],
                         "fit_wall_rows_per_s": r.get("median_rows_per_s_fit_wall"),
                         "in_memory_path": ss[0].get("in_memory"),
                         "x_vs_memory": (r["median_rows_per_s"] /
                                         s["variants"]["memory"]["median_rows_per_s"])
                         if "memory" in s["variants"] else None,
                         "others": statistics.median(x["others_cores"] for x in ss),
                         "load1": statistics.median(x["load_before"][0] for x in ss)})
        print(f"\n3. SAE topk d={s['d']} -> {s['n_latents']} latents, k={args.sae_k}, batch "
              f"{args.sae_batch}, {args.sae_rows} rows, {args.sae_rounds} rounds, "
              f"{s['torch_threads']} torch thread(s) (stream: buffer_mb={s['stream_buffer_mb']})")
        print(table(rows, ["variant", "rows", "steps", "rows_per_s", "best_rows_per_s",
                           "rows_per_cpu_s", "fit_wall_rows_per_s", "in_memory_path",
                           "x_vs_memory", "others", "load1"]))
        for v in ("store", "stream"):
            if f"{v}_over_memory" in s:
                x = s[f"{v}_over_memory"]
                if v == "store":
                    aims["sae_store/memory>=0.8"] = x >= 0.8
                print(f"   {v} / memory = {x:.2f} median rows/s" +
                      (f" (aim >= 0.8: {'met' if x >= 0.8 else 'MISSED'})" if v == "store" else "")
                      + f"; {s[f'{v}_over_memory_best']:.2f} best run; "
                      f"{s[f'{v}_over_memory_cpu']:.2f} per CPU-second")
    print(f"\nload average: start {out['load_start']}, end {out['load_end']} on "
          f"{os.cpu_count()} CPUs; wall {out['wall_seconds']:.0f}s "
          f"(shard generation {out['generation']['seconds']:.0f}s)")
    print("aims: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in aims.items()))
    return aims


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="neuron,cluster,pca,sae",
                   help="comma list of neuron,cluster,pca,sae")
    p.add_argument("--cache", default=str(OUT / "analysis_scaling_cache"),
                   help="the store (written once, reused while sizes match)")
    p.add_argument("--shards", type=int, default=50)
    p.add_argument("--rows", type=int, default=10000, help="rows per shard")
    p.add_argument("--d", type=int, default=512, help="features of the layer")
    p.add_argument("--seed", type=int, default=0)
    # neuron
    p.add_argument("--variants", default="ray,inproc,inproc1,naive,naive_concat",
                   help="neuron variants: ray,inproc,inproc1,naive,naive_concat")
    p.add_argument("--rounds", type=int, default=2, help="neuron rounds (variants interleaved)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--ray-worker-niceness", type=int, default=None,
                   help="RAY_worker_niceness for the workers (default: Ray's own, 15 on Linux)")
    p.add_argument("--breakdown-shards", type=int, default=3)
    p.add_argument("--quiet", type=float, default=0.25,
                   help="a run is 'quiet' when other processes kept fewer cores busy than this")
    # pca
    p.add_argument("--cluster-sizes", default="0.5,1",
                   help="store sizes in GB for the cluster section (the issue's grid: 0.5,1,2)")
    p.add_argument("--cluster-workers", default="1,2,4", help="worker counts (cluster CPUs)")
    p.add_argument("--cluster-rounds", type=int, default=1)
    p.add_argument("--cluster-png", default=str(OUT / "analysis_scaling_cluster.png"),
                   help="where the curves go (the published one: benchmarks/plots/)")
    p.add_argument("--pca-shards", type=int, default=None, help="shards used (default: all)")
    p.add_argument("--n-components", type=int, default=10)
    p.add_argument("--sklearn-solvers", default="auto", help="e.g. auto,full,randomized")
    p.add_argument("--pca-engine", default="inproc,ray",
                   help="also time Engine(store).run(['feature']) over every shard, in-process "
                        "and/or on Ray ('' for neither)")
    p.add_argument("--pca-rounds", type=int, default=2)
    # sae
    p.add_argument("--sae-rows", type=int, default=40960, help="training rows (max_rows)")
    p.add_argument("--sae-k", type=int, default=16)
    p.add_argument("--sae-expansion", type=int, default=4)
    p.add_argument("--sae-batch", type=int, default=1024)
    p.add_argument("--sae-stream-buffer-mb", type=float, default=64.0,
                   help="buffer_mb of the streaming variant (below the rows' size)")
    p.add_argument("--sae-variants", default="store,stream,memory")
    p.add_argument("--sae-rounds", type=int, default=2)
    p.add_argument("--sae-threads", type=int, default=1,
                   help="torch threads for the SAE variants (0: leave torch's default); with 2 "
                        "OpenMP threads on 2 shared cores one fit varied 3.4-30 s run to run")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None,
                   help="run with glibc MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = this "
                        "many bytes (e.g. 1073741824): big temporaries reuse heap pages instead "
                        "of fresh mmaps (fewer page faults); default: glibc's own")
    p.add_argument("--json", default=str(OUT / "analysis_scaling.json"))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    args.sklearn_solvers = [s.strip() for s in args.sklearn_solvers.split(",") if s.strip()]
    args.sae_variants = [s.strip() for s in args.sae_variants.split(",") if s.strip()]
    args.cluster_sizes = [s.strip() for s in args.cluster_sizes.split(",") if s.strip()]
    args.cluster_workers = [s.strip() for s in args.cluster_workers.split(",") if s.strip()]
    if args.pca_shards is None:
        args.pca_shards = args.shards
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    setup_logging()
    args = parse_args(argv)
    if args.malloc_mmap_threshold is not None and argv is None and \
            os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(args.malloc_mmap_threshold):
        # glibc reads these at process start: re-run this script with them set (Ray's raylet
        # and workers, started later by this process, inherit them)
        value = str(args.malloc_mmap_threshold)
        os.environ.update(MALLOC_MMAP_THRESHOLD_=value, MALLOC_TRIM_THRESHOLD_=value)
        log.info("re-running with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=%s", value)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.verbose:
        logging.getLogger("bench").setLevel(logging.DEBUG)
    if args.ray_worker_niceness is not None:   # a Ray system setting, read when nodes start
        os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    t_start = time.perf_counter()
    out: dict[str, Any] = OrderedDict(benchmark="analysis_scaling", load_start=load())
    cache = Path(args.cache)
    root, gen = ensure_store(cache, args.shards, args.rows, args.d, args.seed)
    warm_root, _ = ensure_store(cache.with_name(cache.name + "_warmup"), 2, 500, args.d, args.seed)
    out["generation"] = gen
    out["store"] = args.facts = store_facts(root)
    t0 = time.perf_counter()
    try:
        if "neuron" in args.sections:
            out["neuron"] = run_neuron(args, root, warm_root)
        if "cluster" in args.sections:
            import ray
            from _cluster_scaling import run_cluster

            if ray.is_initialized():
                ray.shutdown()

            def make_store(shards: int) -> Path:
                if shards == args.shards:
                    return root
                return ensure_store(cache.with_name(f"{cache.name}_{shards}"), shards, args.rows,
                                    args.d, args.seed)[0]
            out["cluster"] = run_cluster(args, make_store, warm_root, engine_neuron, Others, load)
        if "pca" in args.sections:
            out["pca"] = run_pca(args, root)
        if "sae" in args.sections:
            out["sae"] = run_sae(args, root)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    out["wall_seconds"] = time.perf_counter() - t0
    out["wall_seconds_including_generation"] = time.perf_counter() - t_start
    out["load_end"] = load()
    out["aims_met"] = report(args, out)
    out["args"] = {k: v for k, v in vars(args).items() if k != "facts"}
    out["env"] = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_",
                                                  "MALLOC_TRIM_THRESHOLD_", "RAY_worker_niceness",
                                                  "OMP_NUM_THREADS")}
    out["machine"] = machine()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    log.info("results written to %s", path)
    return out


if __name__ == "__main__":
    main()
