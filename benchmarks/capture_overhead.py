"""Training-step overhead of capture on the demo model (NeuroFMX, CPU), variants interleaved.

Usage::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python benchmarks/capture_overhead.py
    .venv/bin/python benchmarks/capture_overhead.py --rounds 40 --block 15 --variants a,b,c,d
    .venv/bin/python benchmarks/capture_overhead.py --sweep 1024,4096,16384,65536   # rows/step

Variants, each with its own copy of the same initial model and its own AdamW, batch 32:

  a  no hooks (Ray is running for every variant, so its daemons load all of them alike)
  b  mechray, 2 layers, every step (``save_hidden_every_n_steps=1``) through the Ray writer pool,
     every other setting at its default (steps gathered into shards of ``shard_target_mb``)
  c  mechray, 2 layers, the default interval (``save_hidden_every_n_steps=200``), Ray pool
  d  naive: a forward hook that ``torch.save``s the layer output synchronously, every step
  e  as b but with the in-process writer threads instead of Ray
  f  as b but with ``steps_per_shard=--coalesce``: one shard holds k sampled steps
  g  as b with the old defaults, side by side: one shard per step (``steps_per_shard=1``) and
     sha256 checksums (``checksum='sha256'``, zip CRC-32 records): what b was before issue 11

b, c, e and f drive the real :class:`mechray.MechIntCallback` through its
``setup`` / ``on_train_batch_start`` / ``on_train_batch_end`` / ``on_fit_end`` hooks with a
minimal stand-in trainer, so the code that runs is exactly what Lightning would run (hooks only
on sampled steps, hand-off after the optimizer step) without Lightning's own loop overhead.

Steps are run round-robin: every round runs a block of ``--block`` steps of every variant (the
order rotates each round), so load from other processes hits all variants alike.  After each
block, a variant's pending shards are drained (``flush``) and that wait is charged to it, so one
variant's background writes do not slow the next variant's block.

Reported per variant: median / mean / p90 step time, the amortised time per step (block walls
including the drain, divided by steps) and ratios to ``a``; ``paired`` is the median over rounds
of (block time / the same round's ``a`` block time).  The aims (b/a <= 1.10, c/a <= 1.01) are
judged on the amortised ratio, which includes every sampled step and every wait for the writer.
For a sparse interval (c) that ratio cannot resolve 1% on a loaded machine, so c is also
estimated from its own sampled steps (their excess over its unsampled median, plus drains).

``--sweep R1,R2,...`` runs a and b (and g with ``--sweep-variants a,b,g``) for each number of
rows per layer per step: the batch is ``R / 32`` (NeuroFMX yields 32 rows per example), so the
training step grows with the rows, as it would; ``max_activations_per_shard`` is raised to
``max(10000, 4 R)`` so no row is dropped.  It prints one table and writes a PNG
(``benchmarks/plots/capture_overhead_sweep.png``) of the ratio and the overhead per step.

Where the time goes (Linux ``/proc``, per variant, ms per step): the training (main) thread on a
CPU, runnable but waiting for a CPU (other processes/threads competing for the cores), off-CPU
(GIL, locks, the in-flight bound, drains), CPU of the driver's other threads (writer threads,
Ray client threads) and of child processes by name (``ray::ShardWriter``,
``ray::ManifestOwner``, ``raylet``, ...); plus first-vs-last-quarter trends, which show costs
that grow with the number of shards already in the store.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT,
    CpuAccount,
    log2_axes,
    machine,
    pyplot,
    save_figure,
    setup_env,
    setup_logging,
    start_ray,
    summary,
    table,
    write_json,
)

setup_env()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("bench.capture_overhead")

DESCRIPTIONS = {
    "a": "no hooks",
    "b": "mechray every step, Ray pool",
    "c": "mechray every 200 steps, Ray pool",
    "d": "naive torch.save in hook, every step",
    "e": "mechray every step, writer threads",
    "f": "mechray every step, steps_per_shard=k, Ray",
    "g": "mechray every step, old defaults (shard/step, sha256), Ray",
}


class StandInTrainer:
    """The attributes :class:`MechIntCallback` reads from a ``pl.Trainer`` on one CPU process."""

    global_rank = 0
    local_rank = 0
    world_size = 1
    is_global_zero = True
    strategy = None

    def __init__(self) -> None:
        self.global_step = 0


class Variant:
    """One way of running a training step; owns its model, optimizer and step counter."""

    def __init__(self, key: str, model: torch.nn.Module, lr: float):
        self.key, self.model = key, model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.step = 0
        self.step_times: list[float] = []
        self.block_walls: list[float] = []   # per round: steps + drain, seconds
        self.cpu: dict[str, float] = {}      # CpuAccount deltas summed over this variant's blocks
        self.cpu_rounds: list[dict[str, float]] = []   # the same, per round
        self.cpu_pids: dict[int, float] = {}  # child-process CPU seconds per pid
        self.cpu_by_process: dict[str, float] = {}
        self.sampled_times: list[float] = []  # step times of sampled steps (measured range)
        self.plain_times: list[float] = []    # step times of the other steps
        self.drain_seconds = 0.0
        self.sampled_steps = 0               # sampled steps inside the measured range

    # hooks around one step; overridden by variants that capture
    def before(self, batch: Any, i: int) -> None: ...
    def after(self, loss: torch.Tensor, batch: Any, i: int) -> None: ...
    def drain(self) -> None: ...
    def close(self) -> None: ...

    def reset(self) -> None:
        """Forget the warm-up."""
        self.step_times.clear()

    def is_sampled(self) -> bool:
        """Whether the next step captures."""
        return False
    def extra(self) -> dict[str, Any]:
        return {}

    def train_step(self, batch: Any, i: int) -> float:
        t0 = time.perf_counter()
        self.before(batch, i)
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(batch)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.after(loss, batch, i)
        if loss.is_cuda:  # the compute stream only: capture's side-stream copies are not waited
            torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t0


class CallbackVariant(Variant):
    """Drives the real MechIntCallback exactly as Lightning calls it."""

    def __init__(self, key, model, lr, config):
        super().__init__(key, model, lr)
        from mechray import MechIntCallback

        self.trainer = StandInTrainer()
        self.callback = MechIntCallback(config)
        self.callback.setup(self.trainer, model, "fit")
        self.every = config.save_hidden_every_n_steps

    def is_sampled(self):
        return self.step % self.every == 0

    def before(self, batch, i):
        self.trainer.global_step = self.step
        self.callback.on_train_batch_start(self.trainer, self.model, batch, i)

    def after(self, loss, batch, i):
        self.trainer.global_step = self.step   # Lightning increments it in the optimizer step
        self.callback.on_train_batch_end(self.trainer, self.model, {"loss": loss}, batch, i)

    def drain(self):
        sampler = self.callback.sampler
        if sampler is not None and sampler._transport is not None and sampler.stats.in_flight:
            sampler.flush()

    def close(self):
        self.callback.on_fit_end(self.trainer, self.model)

    def _figures(self) -> dict[str, float]:
        stats = self.callback.sampler.stats
        f = self.callback.figures()
        return {"shards_written": f["mechray/shards_written"],
                "bytes_captured": f["mechray/bytes_captured"],
                "train_thread_seconds_reported": f["mechray/train_thread_seconds"],
                "hook_seconds": self.callback.sampler.capture_seconds,
                "blocked_seconds": stats.blocked_seconds if stats else 0.0}

    def reset(self):
        super().reset()
        self._base = self._figures()   # figures count from the end of the warm-up

    def extra(self):
        now, base = self._figures(), getattr(self, "_base", {})
        out = {k: v - base.get(k, 0.0) for k, v in now.items()}
        out["shards_written"] = int(out["shards_written"])
        out["bytes_captured"] = int(out["bytes_captured"])
        out["transport"] = type(self.callback.sampler._transport).__name__ \
            if self.callback.sampler._transport else None
        return out


class NaiveVariant(Variant):
    """The baseline users write first: ``torch.save`` inside the forward hook, every step."""

    def __init__(self, key, model, lr, layers, out_dir: Path):
        super().__init__(key, model, lr)
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]
        self.files = 0

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            torch.save(output.detach(), self.out_dir / f"step{self.step:06d}_{name}.pt")
            self.files += 1
        return hook

    def is_sampled(self):
        return True

    def close(self):
        for h in self.handles:
            h.remove()

    def extra(self):
        return {"files_written": self.files - self._base}

    def reset(self):
        super().reset()
        self._base = self.files


def build(args, store_root: Path) -> dict[str, Variant]:
    from mechray import MechIntConfig
    from mechray.demo.model import NeuroFMX

    torch.manual_seed(args.seed)
    base = NeuroFMX(n_neurons=32, d_model=args.d_model, n_blocks=8)
    layers = args.layers.split(",")

    def config(key: str, every: int, use_ray: bool, **fields: Any) -> MechIntConfig:
        if args.max_rows is not None:
            fields.setdefault("max_activations_per_shard", args.max_rows)
        return MechIntConfig(sample_layers=layers, save_hidden_every_n_steps=every,
                             storage_path=str(store_root / key), verbose=False, use_ray=use_ray,
                             **fields)

    variants: dict[str, Variant] = {}
    for key in args.variants:
        model = copy.deepcopy(base).to(args.device)
        if key == "a":
            variants[key] = Variant(key, model, args.lr)
        elif key == "b":
            variants[key] = CallbackVariant(key, model, args.lr, config(key, 1, True))
        elif key == "c":
            variants[key] = CallbackVariant(key, model, args.lr, config(key, args.interval, True))
        elif key == "d":
            variants[key] = NaiveVariant(key, model, args.lr, layers, store_root / key)
        elif key == "e":
            variants[key] = CallbackVariant(key, model, args.lr, config(key, 1, False))
        elif key == "f":
            variants[key] = CallbackVariant(key, model, args.lr,
                                            config(key, 1, True, steps_per_shard=args.coalesce))
        elif key == "g":
            variants[key] = CallbackVariant(key, model, args.lr,
                                            config(key, 1, True, steps_per_shard=1,
                                                   checksum="sha256"))
        else:
            raise SystemExit(f"unknown variant {key!r}; choose from {','.join(DESCRIPTIONS)}")
    return variants


def batches(n_trials: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mechray.demo.model import spike_dataset

    spikes, behaviour = spike_dataset(n_trials=n_trials, seed=seed).tensors
    order = torch.randperm(n_trials, generator=torch.Generator().manual_seed(seed))
    return [(spikes[idx], behaviour[idx]) for idx in order.split(batch_size)
            if len(idx) == batch_size]


def run(args) -> dict[str, Any]:
    store_root = Path(tempfile.mkdtemp(prefix="capture_overhead-", dir=args.scratch))
    load_before = list(__import__("os").getloadavg())
    try:
        if any(k in ("b", "c", "f", "g") for k in args.variants):
            start_ray(args.ray_cpus)
        data = [tuple(t.to(args.device) for t in b)
                for b in batches(args.trials, args.batch_size, args.seed)]
        variants = build(args, store_root)
        order = list(variants.values())
        i = 0
        log.info("warm-up: %d steps per variant (creates the writer pools)", args.warmup)
        for v in order:
            for _ in range(args.warmup):
                v.train_step(data[i % len(data)], i)
                i += 1
            v.drain()
        for v in order:
            v.reset()
        cpu = CpuAccount()
        for r in tqdm(range(args.rounds), desc="rounds", unit="round", file=sys.stderr):
            rot = r % len(order)
            for v in order[rot:] + order[:rot]:
                before = cpu.snapshot()
                t0 = time.perf_counter()
                for _ in range(args.block):
                    sampled = v.is_sampled()
                    dt = v.train_step(data[i % len(data)], i)
                    v.step_times.append(dt)
                    (v.sampled_times if sampled else v.plain_times).append(dt)
                    i += 1
                t1 = time.perf_counter()
                v.drain()
                t2 = time.perf_counter()
                after = cpu.snapshot()
                v.drain_seconds += t2 - t1
                v.block_walls.append(t2 - t0)
                d = CpuAccount.delta(after, before)
                for pid, x in d.pop("pids").items():
                    v.cpu_pids[pid] = v.cpu_pids.get(pid, 0.0) + x
                v.cpu_rounds.append(d)
                for k, x in d.items():
                    v.cpu[k] = v.cpu.get(k, 0.0) + x
        for v in order:
            v.sampled_steps = len(v.sampled_times)
            v.cpu_by_process = cpu.by_label(v.cpu_pids)
        extras = {}
        for v in order:
            t0 = time.perf_counter()
            v.close()
            extras[v.key] = {**v.extra(), "close_seconds": time.perf_counter() - t0}
    finally:
        if not args.keep:
            shutil.rmtree(store_root, ignore_errors=True)
    return report(args, variants, extras, load_before, store_root)


def report(args, variants: dict[str, Variant], extras, load_before, store_root) -> dict[str, Any]:
    a = variants.get("a")
    steps = args.rounds * args.block
    base_med = statistics.median(a.step_times) if a else None
    base_amort = sum(a.block_walls) / steps if a else None
    rows, cpu_rows, results = [], [], {}
    for key, v in variants.items():
        s = summary(v.step_times)
        amort = sum(v.block_walls) / steps
        paired = sorted(w / wa for w, wa in zip(v.block_walls, a.block_walls)) if a else []
        res = {"description": DESCRIPTIONS[key], "step_seconds": s, "amortised_seconds": amort,
               "drain_seconds": v.drain_seconds, "steps": steps,
               "sampled_steps": v.sampled_steps, "block_walls": v.block_walls,
               "sampled_step_seconds": summary(v.sampled_times) if v.sampled_times else None,
               **extras.get(key, {})}
        # where the time went, per step: the main thread on a CPU, waiting for a CPU, off-CPU
        # by choice (GIL, locks, I/O, the in-flight bound), other threads, other processes (Ray)
        wall = sum(v.block_walls)
        c = v.cpu
        res["cpu_ms_per_step"] = {
            "main_on_cpu": c.get("main_run", 0) * 1e3 / steps,
            "main_waiting_for_cpu": c.get("main_wait", 0) * 1e3 / steps,
            "main_off_cpu": (wall - c.get("main_run", 0) - c.get("main_wait", 0)) * 1e3 / steps,
            "driver_other_threads": c.get("threads", 0) * 1e3 / steps,
            "child_processes": c.get("children", 0) * 1e3 / steps,
        }
        # does the per-step cost grow as the store fills up?  first vs last quarter of rounds
        q = max(1, len(v.cpu_rounds) // 4)
        per = lambda rs, k: sum(r[k] for r in rs) * 1e3 / (len(rs) * args.block)  # noqa: E731
        res["trend_ms_per_step"] = {
            "wall_first_quarter": sum(v.block_walls[:q]) * 1e3 / (q * args.block),
            "wall_last_quarter": sum(v.block_walls[-q:]) * 1e3 / (q * args.block),
            **{f"{k}_{part}": per(rs, k) for k in ("children", "threads")
               for part, rs in (("first_quarter", v.cpu_rounds[:q]),
                                ("last_quarter", v.cpu_rounds[-q:]))}}
        res["cpu_rounds"] = v.cpu_rounds
        res["child_cpu_ms_per_step_by_process"] = {
            k: x * 1e3 / steps for k, x in sorted(v.cpu_by_process.items(), key=lambda kv: -kv[1])
            if x > 0}
        if a:
            res["ratio_median"] = s["median"] / base_med
            res["ratio_amortised"] = amort / base_amort
            res["ratio_paired_median"] = statistics.median(paired)
            res["ratio_paired_p10_p90"] = [paired[int(0.1 * (len(paired) - 1))],
                                           paired[int(0.9 * (len(paired) - 1))]]
            if key != "a":
                res["overhead_ms_per_step"] = (amort - base_amort) * 1e3
            if v.sampled_times and v.plain_times:
                # noise-robust estimate for sparse sampling: the extra time of sampled steps
                # (over this variant's own unsampled median) plus drains, spread over all steps
                excess = sum(v.sampled_times) - \
                    len(v.sampled_times) * statistics.median(v.plain_times)
                res["ratio_estimated_from_sampled_steps"] = \
                    1 + (excess + v.drain_seconds) / (steps * base_med)
                res["sampled_step_excess_ms"] = excess * 1e3 / len(v.sampled_times)
        results[key] = res
        rows.append({"variant": f"{key}: {DESCRIPTIONS[key]}", "sampled": v.sampled_steps,
                     "median_ms": s["median"] * 1e3, "p90_ms": s["p90"] * 1e3,
                     "amortised_ms": amort * 1e3,
                     "x_median": res.get("ratio_median"), "x_amortised": res.get("ratio_amortised"),
                     "x_paired": res.get("ratio_paired_median")})
        cpu_rows.append({"variant": key, "wall": amort * 1e3,
                         **{k: round(x, 2) for k, x in res["cpu_ms_per_step"].items()}})
    aims = {}
    if a and "b" in results:
        aims["b/a<=1.10"] = results["b"]["ratio_amortised"] <= 1.10
    if a and "c" in results:
        aims["c/a<=1.01"] = results["c"]["ratio_amortised"] <= 1.01
    out = {"benchmark": "capture_overhead", "args": vars(args), "machine": machine(),
           "loadavg_before": load_before, "loadavg_after": list(__import__("os").getloadavg()),
           "results": results, "aims_met": aims,
           "store_kept_at": str(store_root) if args.keep else None}
    print()
    print(f"capture overhead: NeuroFMX d_model={args.d_model}, batch {args.batch_size}, "
          f"layers {args.layers}, {args.rounds} rounds x {args.block} steps per variant, "
          f"torch threads {torch.get_num_threads()}")
    print(table(rows, ["variant", "sampled", "median_ms", "p90_ms", "amortised_ms",
                       "x_median", "x_amortised", "x_paired"]))
    print()
    print("where the time went (ms per step, amortised; wall = main on + waiting for cpu + off):")
    print(table(cpu_rows, ["variant", "wall", "main_on_cpu", "main_waiting_for_cpu",
                           "main_off_cpu", "driver_other_threads", "child_processes"]))
    print()
    for key in ("b", "c", "d", "e", "f", "g"):
        if key in results and a:
            r = results[key]
            est = r.get("ratio_estimated_from_sampled_steps")
            lo, hi = r["ratio_paired_p10_p90"]
            print(f"{key}/a = {r['ratio_amortised']:.3f} amortised, {r['ratio_median']:.3f} median "
                  f"step, paired rounds {r['ratio_paired_median']:.3f} [p10 {lo:.3f}, p90 {hi:.3f}]"
                  + (f"; from sampled steps {est:.4f} (+{r['sampled_step_excess_ms']:.1f} ms "
                     f"per sampled step)" if est is not None else ""))
    for key in ("b", "c", "e", "f", "g"):
        if key in results and "hook_seconds" in results[key]:
            r = results[key]
            ms = {k: r[k] * 1e3 / steps for k in ("train_thread_seconds_reported", "hook_seconds",
                                                   "blocked_seconds", "drain_seconds")}
            print(f"{key}: {r['shards_written']} shards, {r['bytes_captured'] / 1e6:.1f} MB; "
                  f"training thread in mechray (reported) "
                  f"{ms['train_thread_seconds_reported']:.2f} ms/step (hooks "
                  f"{ms['hook_seconds']:.2f}, blocked on in-flight bound "
                  f"{ms['blocked_seconds']:.2f}), drain {ms['drain_seconds']:.2f} ms/step; "
                  f"measured overhead {r.get('overhead_ms_per_step', float('nan')):.2f} ms/step")
    for key in ("a", "b", "e", "f", "g"):
        if key in results:
            t = results[key]["trend_ms_per_step"]
            print(f"{key} first vs last quarter of rounds (ms/step): wall "
                  f"{t['wall_first_quarter']:.1f} -> {t['wall_last_quarter']:.1f}, child processes "
                  f"{t['children_first_quarter']:.1f} -> {t['children_last_quarter']:.1f}, "
                  f"driver threads {t['threads_first_quarter']:.1f} -> "
                  f"{t['threads_last_quarter']:.1f}")
    for key in variants:
        by = results[key]["child_cpu_ms_per_step_by_process"]
        print(f"{key} child-process CPU ms/step: " + ", ".join(f"{k} {x:.2f}" for k, x in by.items()
                                                               if x >= 0.05))
    print("aims (amortised):", ", ".join(f"{k} {'met' if ok else 'MISSED'}"
                                         for k, ok in aims.items()) or "n/a")
    print(f"load average before {load_before}, after {out['loadavg_after']} "
          f"on {out['machine']['host_cpus']} CPUs")
    return out


ROWS_PER_EXAMPLE = 32   # NeuroFMX(n_neurons=32): a [B, 32, d] output per hooked block
FIGURES = Path(__file__).resolve().parent / "plots"


def sweep(args) -> dict[str, Any]:
    """Variants ``--sweep-variants`` for each rows-per-step in ``args.sweep``: a table and a PNG."""
    points, rows = [], []
    for n in args.sweep:
        a = copy.copy(args)
        a.batch_size = max(1, n // ROWS_PER_EXAMPLE)
        a.trials = max(args.trials, 4 * a.batch_size)
        a.max_rows = max(10000, 4 * n)
        a.variants = args.sweep_variants
        a.rounds, a.block, a.warmup = args.sweep_rounds, args.sweep_block, 3
        log.info("sweep: %d rows per layer per step (batch %d)", n, a.batch_size)
        out = run(a)
        res = out["results"]
        steps = a.rounds * a.block
        point = {"rows_per_step": n, "batch": a.batch_size, "loadavg_after": out["loadavg_after"],
                 "a_ms": res["a"]["amortised_seconds"] * 1e3, "a_cpu_ms": _cpu_ms(res["a"])}
        for k in a.variants:
            if k == "a":
                continue
            r = res[k]
            point[f"{k}_ms"] = r["amortised_seconds"] * 1e3
            point[f"{k}/a"] = r["ratio_amortised"]
            point[f"{k}_paired"] = r["ratio_paired_median"]
            point[f"{k}_overhead_ms"] = r["overhead_ms_per_step"]
            # CPU per step of every process of the run (training thread, writer threads, Ray):
            # what capture costs the machine, much less sensitive to other users' load than wall
            point[f"{k}_cpu_overhead_ms"] = _cpu_ms(r) - point["a_cpu_ms"]
            point[f"{k}_cpu/a"] = _cpu_ms(r) / point["a_cpu_ms"]
            point[f"{k}_shards"] = r.get("shards_written")
            point[f"{k}_mb_per_step"] = r.get("bytes_captured", 0) / 1e6 / steps
        points.append(point)
        rows.append({"rows/step": n, "batch": a.batch_size, "a ms": point["a_ms"],
                     **{f"{k} {m}": point[f"{k}{suffix}"] for k in a.variants if k != "a"
                        for m, suffix in (("ms", "_ms"), ("/a", "/a"), ("paired", "_paired"),
                                          ("+ms", "_overhead_ms"), ("cpu/a", "_cpu/a"),
                                          ("+cpu ms", "_cpu_overhead_ms"), ("shards", "_shards"),
                                          ("MB/step", "_mb_per_step"))},
                     "load": f"{point['loadavg_after'][0]:.1f}"})
    print()
    print("capture overhead sweep (amortised ms per step; /a = ratio to no hooks; +ms = overhead "
          "per step; cpu/a and +cpu ms: the same for CPU time of all processes; shards written "
          "in the measured steps):")
    print(table(rows, list(rows[0])))
    plot = _plot_sweep(points, [k for k in args.sweep_variants if k != "a"])
    print(f"plot: {plot}")
    return {"benchmark": "capture_overhead_sweep", "args": vars(args), "machine": machine(),
            "points": points, "plot": str(plot)}


def _cpu_ms(result: dict[str, Any]) -> float:
    c = result["cpu_ms_per_step"]
    return c["main_on_cpu"] + c["driver_other_threads"] + c["child_processes"]


def _plot_sweep(points: list[dict[str, Any]], keys: list[str]) -> Path:
    fig, (ax, ox) = pyplot().subplots(1, 2, figsize=(10, 4))
    x = [p["rows_per_step"] for p in points]
    for k, color in zip(keys, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        ax.plot(x, [p[f"{k}/a"] for p in points], color=color, marker="o",
                label=f"{k}: {DESCRIPTIONS[k]} (wall)")
        ax.plot(x, [p[f"{k}_cpu/a"] for p in points], "--", color=color, marker="s",
                label=f"{k} (CPU of all processes)")
        ox.plot(x, [max(p[f"{k}_cpu_overhead_ms"], 1e-2) for p in points], color=color,
                marker="o", label=f"{k}: extra CPU ms per step")
    ox.plot(x, [p["a_cpu_ms"] for p in points], "k:", marker=".", label="a: CPU ms per step")
    ax.axhline(1.10, color="grey", lw=0.8)
    log2_axes(((ax, "step time ÷ no hooks (amortised)"), (ox, "ms per step")),
              "rows per layer per step (2 layers x 64 floats)")
    ox.set_yscale("log")
    ax.legend(fontsize=7)
    ox.legend(fontsize=7)
    return save_figure(fig, FIGURES / "capture_overhead_sweep.png",
                       "every-step capture cost vs rows per step (NeuroFMX, CPU, 2 vCPU)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="a,b,c,d,e,f,g",
                   help="comma list from a,b,c,d,e,f,g (see the module docstring)")
    p.add_argument("--rounds", type=int, default=40, help="round-robin rounds")
    p.add_argument("--block", type=int, default=15, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per variant")
    p.add_argument("--interval", type=int, default=200,
                   help="variant c's save_hidden_every_n_steps")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (the CUDA path: pinned buffers, side stream, events)")
    p.add_argument("--coalesce", type=int, default=9,
                   help="variant f: steps per shard (9 x 1024 rows fits max_activations_per_shard)")
    p.add_argument("--layers", default="mamba_backbone.blocks.3,mamba_backbone.blocks.7",
                   help="the 2 (or more) layers captured")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-rows", type=int, default=None,
                   help="max_activations_per_shard of the mechray variants (default: its default)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--trials", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (the demo uses cores-1 = 1 on 2 cores)")
    p.add_argument("--ray-cpus", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", default=None, help="where shards go (a temp dir inside it)")
    p.add_argument("--keep", action="store_true", help="keep the written shards")
    p.add_argument("--sweep", default=None,
                   help="comma list of rows per layer per step (e.g. 1024,4096,16384,65536)")
    p.add_argument("--sweep-variants", default="a,b", help="--sweep: the variants run")
    p.add_argument("--sweep-rounds", type=int, default=6, help="--sweep: rounds per point")
    p.add_argument("--sweep-block", type=int, default=5, help="--sweep: steps per block")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.sweep = [int(x) for x in args.sweep.split(",")] if args.sweep else None
    args.sweep_variants = [v.strip() for v in args.sweep_variants.split(",") if v.strip()]
    if args.sweep and "a" not in args.sweep_variants:
        p.error("--sweep-variants must include a (the baseline)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "a" not in args.variants:
        p.error("--variants must include a (the baseline)")
    if "c" in args.variants and (args.rounds * args.block) % args.interval:
        log.warning("rounds*block=%d is not a multiple of --interval=%d: c's sampled share is "
                    "not exactly 1/%d", args.rounds * args.block, args.interval, args.interval)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log\\(\\).*")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.scratch is None:
        args.scratch = str(OUT)
    t0 = time.perf_counter()
    result = sweep(args) if args.sweep else run(args)
    result["wall_seconds"] = time.perf_counter() - t0
    print(f"total wall {result['wall_seconds']:.0f}s")
    if not args.no_json:
        write_json("capture_overhead_sweep" if args.sweep else "capture_overhead", result)


if __name__ == "__main__":
    main()
