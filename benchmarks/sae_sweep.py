"""A sweep of 3 SAEs on one read of the rows against 3 separate fits, side by side in one process.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/sae_sweep.py --quick     # d 32, ~a minute
    PYTHONPATH=. .venv/bin/python benchmarks/sae_sweep.py             # d 128, 1,024 latents

One planted-dictionary store (``mechray.testing.planted_dictionary``), then, alternating
``--repeats`` times in this process (so both see the same machine load): ``sae`` with
``sweep={"k": [k/2, k, 2k]}`` (one pass: every batch read, decoded and shuffled once and fed to
the 3 SAEs) and the 3 fits of those settings one after the other.  Two data regimes:
``in-memory`` (the layer's rows fit ``buffer_mb``: read once per fit, then epochs from memory)
and ``streamed`` (``buffer_mb`` 1: every epoch reads the shards again through the shuffle
buffer, as a store larger than memory does).  Reported: wall seconds (median; and the ratio
of the fastest runs), the process' CPU seconds (median: what a machine shared with others
distorts least; torch runs one thread), shard loads
(counted on the store), the ratio separate / sweep, and EV / L0 per setting (equal both ways:
the same SAEs).  Results: ``out/sae_sweep-<time>.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_env, setup_logging, table, write_json  # noqa: E402

log = logging.getLogger("bench.sae_sweep")


def write_store(path: Path, x, per_shard: int, **kw) -> None:
    from mechray.testing import rows_store

    rows_store(path, x, per_shard, **kw)

def counted_store(root: Path) -> tuple[Any, Counter]:
    from mechray.storage.reader import ShardStore

    store, loads = ShardStore(root), Counter()
    real = store.load

    def load(shard: Any, *args: Any, **kw: Any) -> Any:
        loads[shard["file"] if isinstance(shard, dict) else str(shard)] += 1
        return real(shard, *args, **kw)

    store.load = load               # type: ignore[method-assign]
    return store, loads


def run(root: Path, out: Path, params: dict[str, Any], ks: list[int], sweep: bool
        ) -> dict[str, Any]:
    from mechray.analysis import Context, get_analysis

    store, loads = counted_store(root)
    t0, c0 = time.perf_counter(), time.process_time()
    if sweep:
        r = get_analysis("sae", {**params, "sweep": {"k": ks}}).fit(
            Context(store=store, out_dir=out), "src")
        per = {f"k={k}": r["results"][f"k={k}"] for k in ks}
    else:
        per = {f"k={k}": get_analysis("sae", {**params, "k": k}).fit(
            Context(store=store, out_dir=out / f"k{k}"), "src") for k in ks}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "shard_loads": sum(loads.values()),
            "ev": {s: round(r["explained_variance"], 4) for s, r in per.items()},
            "l0": {s: round(r["l0"], 2) for s, r in per.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d 32, 128 latents, 300 steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    setup_env()
    setup_logging(args.verbose)
    import torch

    from mechray.testing import planted_dictionary

    torch.set_num_threads(1)
    d, latents, k, rows, steps = (32, 128, 4, 24000, 300) if args.quick else \
        (128, 1024, 16, 96000, 600)
    ks = [k // 2, k, 2 * k]
    params = {"n_latents": latents, "batch_size": 512, "lr": 3e-3, "steps": steps,
              "device": "cpu", "top_latents": 8, "checkpoint_every": 0, "save_weights": False}
    results: dict[str, Any] = {"machine": machine(), "d": d, "n_latents": latents, "ks": ks,
                               "rows": rows, "steps": steps, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-sae-sweep-") as tmp:
        root = Path(tmp) / "store"
        _, x = planted_dictionary(d, latents // 2, 3, rows, seed=0)
        write_store(root, x, per_shard=rows // 16)
        rows_out = []
        for regime, extra in (("in-memory", {}), ("streamed", {"buffer_mb": 1.0})):
            walls: dict[str, list[float]] = {"sweep": [], "separate": []}
            cpus: dict[str, list[float]] = {"sweep": [], "separate": []}
            last: dict[str, dict[str, Any]] = {}
            for rep in range(args.repeats):
                for mode in ("sweep", "separate"):
                    got = run(root, Path(tmp) / f"{regime}-{mode}-{rep}", {**params, **extra},
                              ks, mode == "sweep")
                    walls[mode].append(got["wall_s"])
                    cpus[mode].append(got["cpu_s"])
                    last[mode] = got
                    results["runs"].append({"regime": regime, "mode": mode, "repeat": rep, **got})
                    log.info("%s %s #%d: %.2f s wall, %.2f CPU s, %d shard loads", regime, mode,
                             rep, got["wall_s"], got["cpu_s"], got["shard_loads"])
            sweep_s, sep_s = statistics.median(walls["sweep"]), statistics.median(walls["separate"])
            rows_out.append({"regime": regime, "sweep of 3 s": round(sweep_s, 2),
                             "3 separate s": round(sep_s, 2),
                             "separate / sweep": round(sep_s / sweep_s, 2),
                             "min: separate / sweep": round(min(walls["separate"]) /
                                                            min(walls["sweep"]), 2),
                             "CPU s sweep": round(statistics.median(cpus["sweep"]), 2),
                             "CPU s separate": round(statistics.median(cpus["separate"]), 2),
                             "CPU: separate / sweep": round(statistics.median(cpus["separate"]) /
                                                            statistics.median(cpus["sweep"]), 2),
                             "loads sweep": last["sweep"]["shard_loads"],
                             "loads separate": last["separate"]["shard_loads"],
                             "same EV": last["sweep"]["ev"] == last["separate"]["ev"],
                             "EV (k/2, k, 2k)": list(last["sweep"]["ev"].values()),
                             "L0": list(last["sweep"]["l0"].values())})
    results["table"] = rows_out
    print(table(rows_out, list(rows_out[0])))
    print(f"results: {write_json('sae_sweep', results)}")


if __name__ == "__main__":
    main()
