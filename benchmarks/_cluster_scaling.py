"""The ``cluster`` section of ``analysis_scaling.py``: neuron stats on a 3-node
``ray.cluster_utils.Cluster`` with 1, 2, 4 workers over stores of 0.5, 1, 2 GB, as seconds per GB
(flat as the store grows: the work is linear in the rows) and a PNG of the curves.

Every node is a real raylet on this machine (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps them
on 127.0.0.1).  For ``w`` workers the cluster is started fresh with ``w`` CPUs spread over its 3
nodes (1: 1+0+0, 2: 1+1+0, 4: 2+1+1): the engine's tasks ask for 1 CPU each, so at most ``w``
run at once, and its SPREAD strategy puts them on every node that has a CPU.  The workers are
warmed on a tiny store first.  Stores are written once by the real capture path (like the main
store) into ``<cache>_<shards>``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("bench.analysis_scaling.cluster")

NODE_CPUS = {1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 4: (2, 1, 1)}


def start_cluster(workers: int):
    """A 3-node cluster with ``workers`` CPUs in all; returns ``(ray, cluster)``."""
    import ray
    from ray.cluster_utils import Cluster

    cpus = NODE_CPUS.get(workers) or (workers - 2 * (workers // 3), workers // 3, workers // 3)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": cpus[0], "include_dashboard": False})
    for c in cpus[1:]:
        cluster.add_node(num_cpus=c)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    deadline = time.monotonic() + 60
    while ray.cluster_resources().get("CPU", 0) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    log.info("3-node cluster with %d CPUs (%s) up in %.1fs", workers, cpus,
             time.perf_counter() - t0)
    return ray, cluster, cpus


def run_cluster(args, make_store: Callable[[int], Path], warm_root: Path,
                engine_neuron: Callable[[Path, bool], Any], Others, load) -> dict[str, Any]:
    sizes = [float(s) for s in args.cluster_sizes]
    workers = [int(w) for w in args.cluster_workers]
    shard_bytes = args.rows * args.d * 4    # 1 "GB" = 1.024e9 B: 50 default shards, as the main store
    stores = {s: make_store(max(1, round(s * 1.024e9 / shard_bytes))) for s in sizes}
    from mechray import ShardStore

    gb = {s: ShardStore(r).total_bytes() / 1e9 for s, r in stores.items()}
    res: dict[str, Any] = {"sizes_gb": {str(s): gb[s] for s in sizes}, "runs": []}
    for w in workers:
        ray, cluster, cpus = start_cluster(w)
        try:
            engine_neuron(warm_root, True)             # worker start and imports not timed
            for r in range(args.cluster_rounds):
                order = sizes if r % 2 == 0 else sizes[::-1]
                for s in order:
                    l0 = load()
                    with Others() as o:
                        engine_neuron(stores[s], True)
                    run = {"workers": w, "node_cpus": list(cpus), "size": s, "gb": gb[s],
                           "seconds": o.wall, "s_per_gb": o.wall / gb[s],
                           "others_cores": o.cores, "load_before": l0, "load_after": load(),
                           **o.usage}
                    res["runs"].append(run)
                    print(f"  cluster: {w} worker(s), {gb[s]:.2f} GB: {o.wall:.2f} s = "
                          f"{o.wall / gb[s]:.2f} s/GB (others {o.cores:.2f} cores, load "
                          f"{l0[0]:.1f})", file=sys.stderr)
        finally:
            ray.shutdown()
            cluster.shutdown()
    res["median_s_per_gb"] = {
        f"{w}x{s}": statistics.median(x["s_per_gb"] for x in res["runs"]
                                      if x["workers"] == w and x["size"] == s)
        for w in workers for s in sizes}
    res["png"] = plot(res, workers, sizes, args.cluster_png)
    return res


def plot(res: dict[str, Any], workers: list[int], sizes: list[float], path: str) -> str:
    from _common import pyplot, save_figure

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 4))
    for w in workers:
        xs = [res["sizes_gb"][str(s)] for s in sizes]
        ys = [res["median_s_per_gb"][f"{w}x{s}"] for s in sizes]
        a.plot(xs, ys, marker="o", label=f"{w} worker(s)")
        b.plot(xs, [y * x for x, y in zip(xs, ys)], marker="o", label=f"{w} worker(s)")
    a.set(xlabel="store size (GB)", ylabel="seconds per GB", ylim=(0, None),
          title="neuron stats, 3-node Ray cluster: time per GB")
    b.set(xlabel="store size (GB)", ylabel="seconds", ylim=(0, None), title="total time")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return str(save_figure(fig, Path(path)))


def report(args, c: dict[str, Any]) -> None:
    from _common import table

    sizes = [float(s) for s in args.cluster_sizes]
    workers = [int(w) for w in args.cluster_workers]
    rows = []
    for w in workers:
        row: dict[str, Any] = {"workers": w}
        runs = [x for x in c["runs"] if x["workers"] == w]
        for s in sizes:
            row[f"{c['sizes_gb'][str(s)]:.2f} GB s/GB"] = c["median_s_per_gb"][f"{w}x{s}"]
        base = c["median_s_per_gb"][f"{workers[0]}x{sizes[-1]}"]
        row[f"x vs {workers[0]} at {sizes[-1]} GB"] = base / c["median_s_per_gb"][f"{w}x{sizes[-1]}"]
        row["others"] = statistics.median(x["others_cores"] for x in runs)
        row["load1"] = statistics.median(x["load_before"][0] for x in runs)
        rows.append(row)
    print(f"\n4. neuron stats on a 3-node ray.cluster_utils.Cluster, seconds per GB (median of "
          f"{args.cluster_rounds} round(s)); PNG: {c['png']}")
    print(table(rows, list(rows[0])))
