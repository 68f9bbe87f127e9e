"""The cost curve of data-parallel SAE training (issue 23 item 5): rows/s and wall time of one
SAE on 1, 2 and 4 workers, reading from a local store and from S3, and where the time goes.

Usage::

    .venv/bin/python benchmarks/sae_scaling.py --quick          # d 32, 2 workers at most: ~minutes
    .venv/bin/python benchmarks/sae_scaling.py                  # d 128, 1024 latents, 1/2/4 workers

Per (source, workers): ``workers == 1`` is the single-process ``sae`` (no Ray); ``workers > 1``
runs ``sae`` with ``num_workers`` on a ``ray.cluster_utils.Cluster`` of that many 1-CPU nodes
(one Ray Train worker each, gloo).  S3 is moto's ``ThreadedMotoServer`` on 127.0.0.1.  Reported:
wall seconds of the fit, training seconds and rows/s (``train.rows_per_second``), speed-up and
efficiency per worker against 1 worker on the same source, the CPU seconds of the driver and every
process it started (:class:`CpuAccount`: Ray's raylets and workers included), and rank 0's wall
split: ``read_s`` (next batch: shard reads and the shuffle buffer), ``step_s`` (forward, backward,
Adam, the gradient all-reduce included) and ``allreduce_s`` (gradient and dead-counter
all-reduces).  Same steps and batch (split over the workers) in every run; EV and L0 show the
runs trained the same SAE.  On a 2-core machine shared with others the speed-up is bounded by the
cores: read the CPU seconds as the projection (work per row stays flat when scaling is sound).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuAccount, machine, setup_env, setup_logging, table, write_json  # noqa: E402

log = logging.getLogger("bench.sae_scaling")


def write_store(path: Path, x, per_shard: int, **kw) -> None:
    from mechray.testing import rows_store

    rows_store(path, x, per_shard, **kw)

def start_cluster(nodes: int):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    deadline = time.monotonic() + 60
    while ray.cluster_resources().get("CPU", 0) < nodes and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray, cluster


def run(store, params: dict[str, Any], workers: int, out: Path) -> dict[str, Any]:
    from mechray.analysis import Context, get_analysis

    ray = cluster = None
    if workers > 1:
        ray, cluster = start_cluster(workers)
    acct = CpuAccount()
    try:
        before, t0 = acct.snapshot(), time.perf_counter()
        r = get_analysis("sae", {**params, "num_workers": workers}).fit(
            Context(store=store, out_dir=out), "src")
        wall = time.perf_counter() - t0
        spent = acct.delta(acct.snapshot(), before)
    finally:
        if ray is not None:
            ray.shutdown()
            cluster.shutdown()
    t = r["train"]
    cpu = spent["main_run"] + spent["threads"] + spent["children"]
    return {"workers": workers, "wall_s": round(wall, 1), "train_s": round(t["seconds"], 1),
            "rows_per_s": round(t["rows_per_second"]), "cpu_s": round(cpu, 1),
            "cpu_s_per_1k_rows": round(1000 * cpu / max(1, t["rows_seen"]), 3),
            "ev": round(r["explained_variance"], 4), "l0": round(r["l0"], 2),
            **(t.get("time_split") or {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small SAE, 1 and 2 workers")
    ap.add_argument("--workers", default=None, help="comma-separated (default 1,2,4; quick 1,2)")
    ap.add_argument("--sources", default="local,s3")
    args = ap.parse_args()
    setup_env()
    setup_logging()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from mechray.storage.reader import ShardStore
    from mechray.testing import LocalS3, planted_dictionary

    torch.set_num_threads(1)
    if args.quick:
        d, feats, k, rows, per_shard, steps, batch = 32, 64, 3, 16000, 1000, 300, 512
    else:
        d, feats, k, rows, per_shard, steps, batch = 128, 512, 8, 200000, 10000, 2000, 2048
    workers = [int(w) for w in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    params = {"n_latents": 8 * d, "k": k, "steps": steps, "batch_size": batch, "lr": 3e-3,
              "device": "cpu", "top_latents": 0, "checkpoint_every": max(100, steps // 4),
              "save_weights": False}
    _, x = planted_dictionary(d, feats, k, rows, seed=0)
    res: dict[str, Any] = {"machine": machine(), "args": vars(args), "params": params,
                           "load_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        s3 = LocalS3() if "s3" in args.sources else None
        try:
            stores = {}
            if "local" in args.sources:
                write_store(Path(tmp) / "local", x, per_shard)
                stores["local"] = ShardStore(Path(tmp) / "local")
            if s3 is not None:
                s3.create_bucket("scaling")
                write_store(Path(tmp) / "s3src", x, per_shard, storage_backend="s3",
                            s3_bucket="scaling", s3_prefix="sae", s3_endpoint_url=s3.url)
                stores["s3"] = ShardStore("s3://scaling/sae", endpoint_url=s3.url,
                                          cache_dir=str(Path(tmp) / "cache"))
            for source, store in stores.items():
                base = None
                for w in workers:
                    row = {"source": source, "load": round(os.getloadavg()[0], 1),
                           **run(store, params, w, Path(tmp) / f"out-{source}-{w}")}
                    base = base or row["rows_per_s"]
                    row["speedup"] = round(row["rows_per_s"] / base, 2)
                    row["efficiency"] = round(row["speedup"] / w, 2)
                    res["runs"].append(row)
                    log.info("%s", row)
        finally:
            if s3 is not None:
                s3.stop()
    res["load_end"] = os.getloadavg()
    cols = ["source", "workers", "wall_s", "train_s", "rows_per_s", "speedup", "efficiency",
            "cpu_s", "cpu_s_per_1k_rows", "read_s", "step_s", "allreduce_s", "ev", "l0", "load"]
    print(table(res["runs"], cols))
    print(f"json: {write_json('sae_scaling', res)}")


if __name__ == "__main__":
    main()
