"""CLI start-up: ``mechray ls`` on a 10^4-shard store, ``--help`` and ``--version``, against
``python -c pass``, each a fresh interpreter, interleaved.

Usage::

    .venv/bin/python benchmarks/cli_startup.py                      # this tree
    .venv/bin/python benchmarks/cli_startup.py --before /path/to/old/tree --repeats 5

Each repeat runs every case once, in turn (``python -c pass``, then each command of each tree),
so the machine's load falls on all of them alike.  A command runs as the console script does:
``python -c "from mechray.cli import main; ..."`` with ``PYTHONPATH`` naming the tree, output to
/dev/null.  ``--before`` adds the same commands from another checkout (e.g. ``main`` before this
change) side by side.  The store: one real shard written by :class:`mechray.ActivationSampler`,
copied to ``--shards`` file names, and one manifest listing them all (``ls`` reads only the
manifest).  Each child also reports whether torch or Ray got imported.
Aim: ``ls`` under 1 s here.  JSON: ``benchmarks/out/cli_startup-*.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup_env, setup_logging, summary, table, write_json  # noqa: E402

log = logging.getLogger("bench.cli_startup")
REPO = Path(__file__).resolve().parent.parent
# runs the command, then says on stderr which heavy modules it imported
CHILD = ("import sys\nfrom mechray.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
         "except SystemExit as e:\n    rc = e.code\n"
         "print('HEAVY=' + ','.join(m for m in ('torch', 'ray') if m in sys.modules), "
         "file=sys.stderr)\nimport mechray\nprint('WHERE=' + mechray.__file__, file=sys.stderr)"
         "\nsys.exit(rc)")


def build_store(path: Path, shards: int) -> None:
    """One real shard, copied to ``shards`` names, all listed in one manifest."""
    import torch

    from mechray import ActivationSampler
    from mechray.storage.manifest import Manifest
    from mechray.storage.shard import shard_name
    from mechray.storage.sink import StorageTarget

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    sampler = ActivationSampler(layers=["0", "2"], save_dir=str(path), use_ray=False,
                                verbose=False)
    sampler.register_hooks(model)
    with torch.no_grad():
        model(torch.randn(8, 16))
    sampler.save_activations(0)
    sampler.close()
    manifest = Manifest(StorageTarget(backend="local", local_dir=str(path)))
    (first,) = manifest.entries()
    src = path / first["file"]
    entries = []
    for i in range(1, shards):
        name = shard_name(index=i, step=i)
        os.link(src, path / name) if hasattr(os, "link") else shutil.copy(src, path / name)
        entries.append({**first, "file": name, "index": i, "step": i, "steps": [i]})
    manifest.add(*entries)


def run_once(tree: Path, argv: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", "pass"] if argv == ["<pass>"] else \
        [sys.executable, "-c", CHILD, *argv]
    t0 = time.perf_counter()
    # cwd: not a checkout (``python -c`` puts the working directory first on sys.path)
    out = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, timeout=600, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[3:] or cmd} in {tree} failed ({out.returncode}): "
                           f"{out.stderr[-2000:]}")
    heavy = next((ln[6:] for ln in out.stderr.splitlines() if ln.startswith("HEAVY=")), "")
    where = next((ln[6:] for ln in out.stderr.splitlines() if ln.startswith("WHERE=")), "")
    if argv != ["<pass>"] and not where.startswith(str(tree)):
        raise RuntimeError(f"the child imported mechray from {where}, not from {tree}")
    return wall, heavy or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=None, help="another checkout to run side by side")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_env()
    setup_logging(args.verbose)
    work = Path(tempfile.mkdtemp(prefix="mechray-cli-bench-"))
    store = work / "store"
    t0 = time.perf_counter()
    build_store(store, args.shards)
    log.info("store of %d shards built in %.1f s", args.shards, time.perf_counter() - t0)
    commands = {"ls": ["ls", str(store)], "--help": ["--help"], "--version": ["--version"]}
    trees = {"this": REPO} | ({"before": Path(args.before).resolve()} if args.before else {})
    cases = [("python -c pass", "-", ["<pass>"], REPO)] + [
        (f"mechray {c}", t, a, tree) for t, tree in trees.items() for c, a in commands.items()
        if t == "this" or c != "--version"]                # older trees may lack --version
    times: dict[tuple[str, str], list[float]] = {(c, t): [] for c, t, _, _ in cases}
    heavy: dict[tuple[str, str], str] = {}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for case, tree_name, cmd, tree in cases:
            wall, heavy[(case, tree_name)] = run_once(tree, cmd)
            times[(case, tree_name)].append(wall)
        load.append(os.getloadavg()[0])
        log.info("repeat %d/%d done (load %.2f)", r + 1, args.repeats, load[-1])
    base = summary(times[("python -c pass", "-")])["median"]
    rows: list[dict[str, Any]] = []
    for (case, tree_name), vals in times.items():
        s = summary(vals)
        rows.append({"case": case, "tree": tree_name, "median_s": round(s["median"], 3),
                     "min_s": round(s["min"], 3), "max_s": round(s["max"], 3),
                     "minus_python_s": round(s["median"] - base, 3),
                     "imports": heavy[(case, tree_name)]})
    print(table(rows, ["case", "tree", "median_s", "min_s", "max_s", "minus_python_s",
                       "imports"]))
    if args.before:
        for c in ("ls", "--help"):
            now, old = (summary(times[(f"mechray {c}", t)])["median"] for t in ("this", "before"))
            print(f"mechray {c}: {old:.2f} s before, {now:.2f} s now ({old / now:.1f}x faster)")
    print(f"1-minute load average during the run: {min(load):.2f} to {max(load):.2f}")
    write_json("cli_startup", {"args": vars(args), "machine": machine(), "results": rows,
                               "loadavg_1m": load})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
