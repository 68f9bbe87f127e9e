"""One SAE trained data-parallel on Ray Train: ``sae`` with ``num_workers > 1``.

Usage::

    import ray
    ray.init()
    get_analysis("sae", {"k": 32, "num_workers": 4}).fit(ctx, "popt")            # CPU, gloo
    get_analysis("sae", {"k": 32, "num_workers": 8, "gpus_per_worker": 1}).fit(ctx, "popt")  # NCCL
    # mechray analyze s3://bucket/run --ray --analyses sae --params '{"sae": {"num_workers": 4}}'

How (``ray.train.torch.TorchTrainer``, one process group, gloo on CPU / NCCL on GPU):

* **Data.** Worker ``r`` of ``W`` streams the shards ``r, r + W, r + 2W, ...`` of the layer
  (manifest order; local disk or S3) through its own :class:`~mechray.analysis.sae.rows.LayerRows`
  shuffle buffer with ``batch_size / W`` rows per step, so a step sees ``batch_size`` rows in all,
  and the step budget, lr and warmup are the single-process ones (computed from all the rows).
* **Model and step.** Every worker builds the same :class:`SparseAutoencoder` (same seed) and
  runs the single-process :class:`~mechray.analysis.sae.train.SAETrainer` step; its Adam step is
  preceded by an all-reduce (mean) of the gradients, so the parameters stay identical.  Decoder
  normalisation is then the same on every worker.  The steps-since-fired counters (AuxK's dead
  latents, the dead fraction) are all-reduced with ``MIN`` after every step: a latent is alive
  when it fired on any worker.  ``b_dec`` / input scale start from a sample gathered from every
  worker; BatchTopK's threshold is calibrated on that gathered sample at the end.  Per-step
  losses are averaged over workers; the held-out evaluation runs once, in the caller, on the
  held-out rows of every shard (the single-process evaluation, unchanged).
* **Tolerance.** Not bit-identical to one process: the rows of a step are drawn per worker
  (another order), BatchTopK's batch top-k and the FVU normaliser are per worker batch.  On the
  planted dictionaries of ``tests/analysis/test_sae_distributed.py`` 2 workers match 1 process
  within 0.01 explained variance and 5% L0 with the dictionary recovered (>= 0.95) by both.
* **Checkpoints.** Every ``checkpoint_every`` steps rank 0 hands Ray Train a checkpoint
  (:mod:`mechray.analysis.sae.checkpoint`'s files, validated on load) under
  ``<checkpoint dir>/sae/ray_train/<layer>-<spec hash>`` (the results directory, see
  :attr:`Context.checkpoint_dir`).  ``FailureConfig(max_failures)`` restarts a group that lost a
  worker from the last checkpoint, and a rerun of the same command (same spec) resumes from it
  (``train.resumed_from_step``).  On a multi-node cluster that directory must be on a shared
  filesystem.  It is removed when the fit finishes.
* **Memory per worker** (float32, :func:`memory_per_worker`): ``40 * n_latents * d`` bytes
  (both weight matrices, their gradients, Adam's two moments and the flat gradient buffer of the
  all-reduce) plus ``8 * batch_size / W * n_latents`` (one step's pre-activations and codes)
  plus the ``buffer_mb`` shuffle buffer: every worker holds the whole dictionary.  At a batch
  of 4,096 rows on one worker: d 1,024 x 16,384 latents 1.2 GB, d 4,096 x 65,536 12.9 GB,
  d 8,192 x 262,144 94 GB.  Above
  :data:`~mechray.analysis.sae.MAX_PARAMETERS` weights (or
  :data:`~mechray.analysis.sae.MAX_LATENTS` latents) the latents would have to be sharded
  across workers (each a slice of the encoder columns and decoder rows, a global top-k), which
  is not supported yet: the error says so and names the size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from mechray.analysis.base import AnalysisParamsError, Context, Skip
from mechray.analysis.sae.budget import auto_lr, budget_rule, budget_steps, loss_flat, sae_warnings
from mechray.analysis.sae.checkpoint import Checkpoint, check
from mechray.analysis.sae.evaluate import evaluate
from mechray.analysis.sae.examples import top_activations
from mechray.analysis.sae.model import SparseAutoencoder
from mechray.analysis.sae.rows import LayerRows
from mechray.analysis.sae.train import SAETrainer, dead_saelens

if TYPE_CHECKING:
    from mechray.analysis.sae.analysis import SAEAnalysis
    from mechray.analysis.sae.params import SAEParams

log = logging.getLogger(__name__)
SAMPLE_ROWS = 65536          # rows gathered from all workers for b_dec and BatchTopK's threshold


class ShardSlice:
    """The store as worker ``rank`` of ``world`` sees it: every ``world``-th shard of ``layer``
    from ``rank`` on (what :class:`LayerRows` reads: ``check_layer``, ``layers``,
    ``iter_layer``)."""

    def __init__(self, store: Any, layer: str, rank: int, world: int):
        self.store, self.layer = store, layer
        self.entries = store.shards(layer)[rank::world]

    def check_layer(self, layer: str) -> None:
        self.store.check_layer(layer)

    def layers(self) -> dict[str, dict[str, Any]]:
        info = self.store.layers()
        rows = sum(int(e.get("rows", {}).get(self.layer, 0)) for e in self.entries)
        info[self.layer] = dict(info[self.layer], rows=rows, shards=len(self.entries))
        return info

    def iter_layer(self, layer: str) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for entry, payload in self.store.payloads(self.entries):
            yield entry, payload["activations"][layer]


def build_trainer(p: "SAEParams", d: int, n_latents: int, total: int, lr: float, warmup: int,
                  device: torch.device) -> SAETrainer:
    """The SAE and trainer of ``sae.fit`` for these parameters (same seed: same start)."""
    gen = torch.Generator().manual_seed(p.seed)
    sae = SparseAutoencoder(d, n_latents, p.architecture, p.k, generator=gen).to(device)
    aux_k = min(d // 2 if p.aux_k is None else p.aux_k, n_latents)
    return SAETrainer(sae, lr, p.l1_coefficient, aux_k, p.aux_coefficient,
                      p.dead_steps_threshold, total_steps=total, warmup_steps=warmup,
                      l0_coefficient=p.l0_coefficient, bandwidth=p.jumprelu_bandwidth)


# --- the worker ---------------------------------------------------------------------------------
def _gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    """Every worker's ``local`` rows (up to SAMPLE_ROWS / world each), concatenated in rank
    order on every worker."""
    import torch.distributed as dist

    local = local[: max(1, SAMPLE_ROWS // world)].contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros(top, local.shape[1], device=local.device, dtype=local.dtype)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def _all_reduce_gradients(trainer: SAETrainer, world: int, spent: dict[str, float]) -> None:
    """Average the gradients over workers just before each Adam step (one flat all-reduce;
    its seconds added to ``spent["allreduce_s"]``)."""
    import torch.distributed as dist

    real_step = trainer.opt.step
    params = [q for group in trainer.opt.param_groups for q in group["params"]]

    def step(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        grads = [q.grad for q in params if q.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        spent["allreduce_s"] += time.perf_counter() - t0
        at = 0
        for g in grads:
            g.copy_(flat[at: at + g.numel()].view_as(g))
            at += g.numel()
        return real_step(*args, **kwargs)

    trainer.opt.step = step     # type: ignore[method-assign]


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: trains ``total`` steps on this worker's shards."""
    import ray.train
    import torch.distributed as dist

    from mechray.analysis.sae.params import SAEParams
    from mechray.analysis.tasks import open_store

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    p = SAEParams(**config["params"])
    local = p.model_copy(update={
        "batch_size": p.batch_size // world,
        "max_rows": None if p.max_rows is None else -(-p.max_rows // world),
        "max_eval_rows": max(16, p.max_eval_rows // world)})
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    store = ShardSlice(open_store(config["ref"]), config["layer"], rank, world)
    data = LayerRows(store, config["layer"], local, device)
    total = config["total"]
    trainer = build_trainer(p, data.d, config["n_latents"], total, config["lr"], config["warmup"],
                            device)
    spent = {"read_s": 0.0, "step_s": 0.0, "allreduce_s": 0.0}   # rank's wall time split
    _all_reduce_gradients(trainer, world, spent)
    losses = torch.zeros(total, device=device)
    resumed, rows_seen, before = None, 0, 0.0
    got = ray.train.get_checkpoint()
    if got is not None:
        with tempfile.TemporaryDirectory(prefix="mechray-sae-restore-",
                                         ignore_cleanup_errors=True) as tmp:
            got.to_directory(tmp)
            done = Checkpoint.at(Path(tmp), config["spec"]).restore(trainer, total)
        if done is not None:
            resumed = trainer.n_steps
            losses[:resumed] = done[0].to(device)
            rows_seen, before = done[1] // world, done[2]
    batches = data.batches(None)
    for _ in range(trainer.n_steps):             # the batches already seen
        next(batches)
    t0 = time.perf_counter()
    sample: Optional[torch.Tensor] = None
    while trainer.n_steps < total:
        t1 = time.perf_counter()
        batch = next(batches)
        t2 = time.perf_counter()
        spent["read_s"] += t2 - t1
        if sample is None:
            assert data.sample is not None
            sample = _gather_rows(data.sample, world)
            if trainer.n_steps == 0:
                trainer.sae.init_from_data(sample, p.normalize_input, p.b_dec_init)
        step = trainer.n_steps
        losses[step] = trainer.step(batch)
        t3 = time.perf_counter()
        dist.all_reduce(trainer.steps_since_fired, op=dist.ReduceOp.MIN)
        spent["allreduce_s"] += time.perf_counter() - t3
        spent["step_s"] += t3 - t2
        rows_seen += len(batch)
        if trainer.n_steps % config["every"] == 0 or trainer.n_steps == total:
            _report(trainer, losses, rows_seen, before + time.perf_counter() - t0, config,
                    rank, world, resumed, sample if trainer.n_steps == total else None, spent)


def _report(trainer: SAETrainer, losses: torch.Tensor, rows_seen: int, seconds: float,
            config: dict[str, Any], rank: int, world: int, resumed: Optional[int],
            sample: Optional[torch.Tensor], spent: dict[str, float]) -> None:
    """A Ray Train report with rank 0's checkpoint (all ranks call it; the last one carries the
    finished SAE, BatchTopK's threshold calibrated on every worker's sample)."""
    import ray.train
    import torch.distributed as dist

    n = trainer.n_steps
    done = losses[:n].clone()
    dist.all_reduce(done)
    done /= world
    losses[:n] = done                      # the mean over workers (idempotent on a prefix)
    rows = torch.tensor([rows_seen], dtype=torch.long, device=losses.device)
    dist.all_reduce(rows)
    if sample is not None and trainer.sae.architecture == "batchtopk":
        trainer.sae.eval()
        trainer.sae.calibrate_threshold(sample[: config["params"]["max_eval_rows"]])
    metrics = {"step": n, "rows_seen": int(rows), "resumed_from_step": resumed,
               "seconds": seconds, "time_split": {k: round(v, 3) for k, v in spent.items()}}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="mechray-sae-ckpt-") as tmp:
        Checkpoint.at(Path(tmp), config["spec"]).save(trainer, done, int(rows), seconds)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --- the caller ---------------------------------------------------------------------------------
def fit_distributed(analysis: "SAEAnalysis", ctx: Context, layer: str,
                    device: torch.device) -> dict[str, Any]:
    """``analysis.fit(ctx, layer)`` on ``num_workers`` Ray Train workers (module docstring)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mechray._util import safe_name
    from mechray.analysis.tasks import StoreRef

    p: SAEParams = analysis.params
    world = p.num_workers
    if not ray.is_initialized():
        raise Skip(f"num_workers={world} trains on Ray Train but Ray is not running here: "
                   f"ray.init() first (mechray analyze --ray), or set num_workers=1")
    have = ray.cluster_resources()
    held = _held_resources()
    for what, each in (("CPU", p.cpus_per_worker), ("GPU", p.gpus_per_worker)):
        free = have.get(what, 0) - held.get(what, 0)
        if each and free < world * each:
            raise AnalysisParamsError(
                f"num_workers={world} x {each} {what} per worker needs {world * each:g} {what}s "
                f"but the Ray cluster has {free:g} besides this task's; lower num_workers or "
                f"{what.lower()}s_per_worker, or add nodes (the workers would wait forever)")
    data = LayerRows(ctx.store, layer, p, device)
    n_latents = p.n_latents or p.expansion_factor * data.d
    analysis._check_sizes(data.d, n_latents)
    shards = len(ctx.store.shards(layer))
    if shards < world or p.batch_size % world:
        raise AnalysisParamsError(
            f"num_workers={world} needs at least as many shards (layer {layer!r} has {shards}) "
            f"and a batch_size divisible by it (batch_size={p.batch_size}); lower num_workers "
            f"or set batch_size to a multiple of it")
    per_epoch = data.steps_per_epoch()
    total = budget_steps(p, per_epoch, n_latents)
    lr = p.lr or auto_lr(n_latents, total)
    warmup = p.warmup_steps if p.warmup_steps is not None else min(1000, total // 20)
    spec = analysis_spec(analysis, ctx, layer, data)
    root = Path(ctx.checkpoint_dir or ctx.out_dir or tempfile.mkdtemp(prefix="mechray-sae-"))
    storage = (root / "sae" / "ray_train").resolve()
    name = f"{safe_name(layer)}-{_digest(spec)}"
    every = p.checkpoint_every or total
    use_gpu = p.gpus_per_worker > 0
    resources = {"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker} if use_gpu else {})}
    config = {"params": p.model_dump(), "ref": StoreRef.of(ctx.store), "layer": layer,
              "n_latents": n_latents, "total": total, "lr": lr, "warmup": warmup,
              "every": every, "spec": spec, "use_gpu": use_gpu,
              "threads": max(1, int(p.cpus_per_worker))}
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=p.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    log.info("sae %s: %d steps on %d Ray Train workers (checkpoints in %s)", layer, total, world,
             storage / name)
    out = trainer.fit()
    if out.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a final checkpoint in {storage / name}")
    sae_trainer = build_trainer(p, data.d, n_latents, total, lr, warmup, device)
    with tempfile.TemporaryDirectory(prefix="mechray-sae-final-") as tmp:
        out.checkpoint.to_directory(tmp)
        final = Checkpoint.at(Path(tmp), spec)
        doc = json.loads((final.directory / "checkpoint.json").read_text())
        check(doc, final.directory / "checkpoint.safetensors", sae_trainer, total + 1)
        from safetensors.torch import load_file

        tensors = load_file(str(final.directory / "checkpoint.safetensors"))
        sae_trainer.load_state(tensors, doc["trainer"])
    metrics = out.metrics or {}
    result = _result(analysis, ctx, layer, data, sae_trainer, tensors["losses"], {
        "lr": lr, "warmup": warmup, "per_epoch": per_epoch, "total": total,
        "n_latents": n_latents, "rows_seen": int(doc["rows_seen"]),
        "seconds": float(doc["seconds"]), "resumed_from_step": metrics.get("resumed_from_step"),
        "device": str(device), "workers": world, "time_split": metrics.get("time_split")})
    shutil.rmtree(storage / name, ignore_errors=True)
    return result


def _held_resources() -> dict[str, float]:
    """What this process holds when it is a Ray task (the engine's fit task), else nothing."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_assigned_resources() if ctx.worker.mode == ray.WORKER_MODE else {}


def analysis_spec(analysis: "SAEAnalysis", ctx: Context, layer: str,
                  data: LayerRows) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (the single-process spec, workers included)."""
    p = analysis.params
    info = ctx.store.layers()[layer]
    return json.loads(json.dumps(
        {"params": p.model_dump(exclude={"checkpoint_every", "top_latents", "latents",
                                         "k_examples", "splice_max_inputs", "save_weights",
                                         "max_failures", "cpus_per_worker"}),
         "layer": layer, "rows": info["rows"], "shards": info["shards"], "d": data.d,
         "n_train": data.n_train, "distributed": True}, sort_keys=True, default=str))


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _result(analysis: "SAEAnalysis", ctx: Context, layer: str, data: LayerRows,
            trainer: SAETrainer, losses: torch.Tensor, run: dict[str, Any]) -> dict[str, Any]:
    """The single-process result layout (``sae.fit``), for an SAE trained on workers."""
    from mechray._util import json_safe as _json_safe

    p = analysis.params
    sae = trainer.sae.eval()
    window = min(p.dead_steps_threshold, trainer.n_steps)
    result = evaluate(sae, data.eval_rows(), trainer.steps_since_fired >= window, p.batch_size)
    result.update(architecture=p.architecture, d_in=data.d, n_latents=run["n_latents"],
                  k=None if p.architecture == "relu" else p.k, trained=True, pretrained=None,
                  dead_saelens=dead_saelens(trainer))
    every = max(1, trainer.n_steps // 100)
    curve = [[i + 1, round(float(v), 6)] for i, v in enumerate(losses.tolist())
             if (i + 1) % every == 0]
    flat, drop = loss_flat(losses)
    result["train"] = {"steps": trainer.n_steps, "epochs": None, "rows_seen": run["rows_seen"],
                       "seconds": run["seconds"],
                       "rows_per_second": run["rows_seen"] / max(run["seconds"], 1e-9),
                       "lr": run["lr"], "lr_auto": p.lr is None, "warmup_steps": run["warmup"],
                       "budget": budget_rule(p, run["per_epoch"], run["total"], run["n_latents"]),
                       "training_rows": data.n_train, "aux_k": trainer.aux_k,
                       "device": run["device"], "in_memory": None, "loss_curve": curve,
                       "final_loss": curve[-1][1] if curve else None, "plateau_drop": drop,
                       "resumed_from_step": run["resumed_from_step"], "workers": run["workers"],
                       "time_split": run["time_split"]}
    if p.architecture == "batchtopk":
        result["train"]["threshold"] = float(sae.threshold.max())
    result["converged"] = flat
    result["warnings"] = sae_warnings(result, p, data)
    result["top_activations"] = top_activations(sae, ctx.store, layer, result, p)
    result["splice"] = analysis._splice(sae, ctx, layer)
    result["weights_path"] = result["config_path"] = result["saelens_path"] = None
    if ctx.out_dir is not None and p.save_weights:
        analysis._save(sae, ctx, layer, result)
    log.info("sae %s: explained variance %.3f, l0 %.1f (%d steps on %d workers, %.1fs)", layer,
             result["explained_variance"], result["l0"], trainer.n_steps, run["workers"],
             run["seconds"])
    return _json_safe(result)


def memory_per_worker(d: int, n_latents: int, batch_size: int, workers: int = 1) -> int:
    """Bytes of float32 training state one worker holds (module docstring): weights, gradients,
    Adam's moments and the all-reduce buffer (``40 * n_latents * d``) and one step's
    pre-activations and codes (``8 * batch_size / workers * n_latents``); not the shuffle
    buffer (``buffer_mb``)."""
    return 40 * n_latents * d + 8 * math.ceil(batch_size / workers) * n_latents
