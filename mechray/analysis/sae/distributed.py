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
  (:mod:`mechray.analysis.sae.checkpoint`'s files, validated on load; one ``sae_<i>``
  directory per SAE) under ``<checkpoint root>/sae/ray_train/<layer>-<spec hash>``
  (:func:`~mechray.analysis.sae.checkpoint.checkpoint_root`: the results directory, or for a
  store on S3 its ``s3://<bucket>/<prefix>.checkpoints`` prefix through pyarrow's S3 filesystem
  on the store's endpoint, :class:`RayTrainStorage`).  ``FailureConfig(max_failures)`` restarts
  a group that lost a worker from the last checkpoint, and a rerun of the same command (same
  spec) resumes from it (``train.resumed_from_step``).  On a multi-node cluster a local
  directory must be on a shared filesystem (S3 need not).  It is removed when the fit finishes.
* **Sweeps** (``sweep``, :mod:`mechray.analysis.sae.sweep`): one Ray Train run trains every
  SAE of the sweep; each worker reads and shuffles its batch once and steps every SAE whose
  next step it is (each SAE's gradients all-reduced on their own), so each SAE is the one its
  setting alone trains on the same workers.
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

from mechray._util import json_safe
from mechray.analysis.base import AnalysisParamsError, Context, Skip
from mechray.analysis.sae.budget import auto_lr, budget_rule, budget_steps, loss_flat, sae_warnings
from mechray.analysis.sae.checkpoint import Checkpoint, check
from mechray.analysis.sae.evaluate import evaluate
from mechray.analysis.sae.examples import top_activations_each
from mechray.analysis.sae.model import SparseAutoencoder
from mechray.analysis.sae.rows import LayerRows
from mechray.analysis.sae.train import SAETrainer, dead_saelens

if TYPE_CHECKING:
    from mechray.analysis.sae.analysis import SAEAnalysis
    from mechray.analysis.sae.params import SAEParams
    from mechray.analysis.sae.sweep import Setting

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


class _Member:
    """One SAE of a worker's pass: its trainer, per-step losses and progress."""

    def __init__(self, cfg: dict[str, Any], d: int, device: torch.device, world: int,
                 spent: dict[str, float]):
        from mechray.analysis.sae.params import SAEParams

        self.cfg, self.p, self.total = cfg, SAEParams(**cfg["params"]), cfg["total"]
        self.trainer = build_trainer(self.p, d, cfg["n_latents"], self.total, cfg["lr"],
                                     cfg["warmup"], device)
        _all_reduce_gradients(self.trainer, world, spent)
        self.losses = torch.zeros(self.total, device=device)
        self.resumed: Optional[int] = None
        self.rows_seen, self.before = 0, 0.0

    def restore(self, directory: Path, world: int) -> None:
        """From this SAE's part of a Ray Train checkpoint (a finished SAE included)."""
        done = Checkpoint.at(directory / self.cfg["dir"], self.cfg["spec"]).restore(
            self.trainer, self.total + 1)
        if done is not None:
            self.resumed = self.trainer.n_steps
            self.losses[: self.resumed] = done[0].to(self.losses.device)
            self.rows_seen, self.before = done[1] // world, done[2]


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: trains every SAE of ``config["saes"]`` (one, or a
    sweep's) on this worker's shards, each batch read once and fed to every SAE whose next
    step it is."""
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
    spent = {"read_s": 0.0, "step_s": 0.0, "allreduce_s": 0.0}   # rank's wall time split
    members = [_Member(cfg, data.d, device, world, spent) for cfg in config["saes"]]
    got = ray.train.get_checkpoint()
    if got is not None:
        with tempfile.TemporaryDirectory(prefix="mechray-sae-restore-",
                                         ignore_cleanup_errors=True) as tmp:
            got.to_directory(tmp)
            for m in members:
                m.restore(Path(tmp), world)
    last = max(m.total for m in members)
    step = min(m.trainer.n_steps for m in members)
    batches = data.batches(None)
    for _ in range(step):                       # the batches every SAE has already seen
        next(batches)
    t0 = time.perf_counter()
    before = max(m.before for m in members)
    sample: Optional[torch.Tensor] = None
    while step < last:
        t1 = time.perf_counter()
        batch = next(batches)
        t2 = time.perf_counter()
        spent["read_s"] += t2 - t1
        if sample is None:
            assert data.sample is not None
            sample = _gather_rows(data.sample, world)
            for m in members:
                if m.trainer.n_steps == 0:
                    m.trainer.sae.init_from_data(sample, m.p.normalize_input, m.p.b_dec_init)
        for m in members:
            if m.trainer.n_steps != step or step >= m.total:
                continue
            m.losses[step] = m.trainer.step(batch)
            t3 = time.perf_counter()
            dist.all_reduce(m.trainer.steps_since_fired, op=dist.ReduceOp.MIN)
            spent["allreduce_s"] += time.perf_counter() - t3
            m.rows_seen += len(batch)
        spent["step_s"] += time.perf_counter() - t2
        step += 1
        if step % config["every"] == 0 or step == last:
            _report(members, step, before + time.perf_counter() - t0, config, rank, world,
                    sample if step == last else None, spent)


def _report(members: list[_Member], step: int, seconds: float, config: dict[str, Any],
            rank: int, world: int, sample: Optional[torch.Tensor],
            spent: dict[str, float]) -> None:
    """A Ray Train report with rank 0's checkpoint, one directory per SAE (all ranks call it;
    the last one carries the finished SAEs, BatchTopK's threshold calibrated on every worker's
    sample)."""
    import ray.train
    import torch.distributed as dist

    rows_seen, dones = [], []
    for m in members:
        n = m.trainer.n_steps
        done = m.losses[:n].clone()
        dist.all_reduce(done)
        done /= world
        m.losses[:n] = done                 # the mean over workers (idempotent on a prefix)
        dones.append(done)
        rows = torch.tensor([m.rows_seen], dtype=torch.long, device=m.losses.device)
        dist.all_reduce(rows)
        rows_seen.append(int(rows))
        if sample is not None and m.trainer.sae.architecture == "batchtopk":
            m.trainer.sae.eval()
            m.trainer.sae.calibrate_threshold(sample[: m.p.max_eval_rows])
    metrics = {"step": step, "rows_seen": rows_seen,
               "resumed_from_step": [m.resumed for m in members], "seconds": seconds,
               "time_split": {k: round(v, 3) for k, v in spent.items()}}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="mechray-sae-ckpt-") as tmp:
        for m, done, rows_n in zip(members, dones, rows_seen):
            Checkpoint.at(Path(tmp) / m.cfg["dir"], m.cfg["spec"]).save(m.trainer, done,
                                                                        rows_n, seconds)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --- the caller ---------------------------------------------------------------------------------
def fit_distributed(analysis: "SAEAnalysis", ctx: Context, layer: str, device: torch.device,
                    sweep: Optional[list["Setting"]] = None) -> Any:
    """``analysis.fit(ctx, layer)`` on ``num_workers`` Ray Train workers (module docstring):
    its result, or with ``sweep`` the list of each setting's result (one pass for all)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mechray._util import safe_name
    from mechray.analysis.sae.checkpoint import checkpoint_root
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
    shards = len(ctx.store.shards(layer))
    if shards < world or p.batch_size % world:
        raise AnalysisParamsError(
            f"num_workers={world} needs at least as many shards (layer {layer!r} has {shards}) "
            f"and a batch_size divisible by it (batch_size={p.batch_size}); lower num_workers "
            f"or set batch_size to a multiple of it")
    members = [(analysis, None)] if sweep is None else [(s.analysis, s.file) for s in sweep]
    per_epoch = data.steps_per_epoch()
    saes: list[dict[str, Any]] = []
    for i, (member, _) in enumerate(members):
        q: SAEParams = member.params
        n_latents = q.n_latents or q.expansion_factor * data.d
        member._check_sizes(data.d, n_latents)
        total = budget_steps(q, per_epoch, n_latents)
        saes.append({"params": q.model_dump(), "n_latents": n_latents, "total": total,
                     "lr": q.lr or auto_lr(n_latents, total), "dir": f"sae_{i}",
                     "warmup": q.warmup_steps if q.warmup_steps is not None else
                     min(1000, total // 20), "spec": analysis_spec(member, ctx, layer, data)})
    root = checkpoint_root(ctx) or tempfile.mkdtemp(prefix="mechray-sae-")
    where = RayTrainStorage(root, ctx.store)
    name = f"{safe_name(layer)}-{_digest({'saes': [m['spec'] for m in saes]})}"
    last = max(m["total"] for m in saes)
    every = p.checkpoint_every or last
    use_gpu = p.gpus_per_worker > 0
    resources = {"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker} if use_gpu else {})}
    config = {"params": p.model_dump(), "ref": StoreRef.of(ctx.store), "layer": layer,
              "saes": saes, "every": every, "use_gpu": use_gpu,
              "threads": max(1, int(p.cpus_per_worker))}
    trainer = TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=where.path,
                             storage_filesystem=where.filesystem,
                             failure_config=FailureConfig(max_failures=p.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    log.info("sae %s: %d SAE(s), %d steps on %d Ray Train workers (checkpoints in %s/%s)", layer,
             len(saes), last, world, where.path, name)
    out = trainer.fit()
    if out.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a final checkpoint in {where.path}/{name}")
    metrics = out.metrics or {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="mechray-sae-final-") as tmp:
        out.checkpoint.to_directory(tmp)
        for i, ((member, _), cfg) in enumerate(zip(members, saes)):
            q = member.params
            sae_trainer = build_trainer(q, data.d, cfg["n_latents"], cfg["total"], cfg["lr"],
                                        cfg["warmup"], device)
            final = Path(tmp) / cfg["dir"]
            doc = json.loads((final / "checkpoint.json").read_text())
            check(doc, final / "checkpoint.safetensors", sae_trainer, cfg["total"] + 1)
            from safetensors.torch import load_file

            tensors = load_file(str(final / "checkpoint.safetensors"))
            sae_trainer.load_state(tensors, doc["trainer"])
            resumed = (metrics.get("resumed_from_step") or [None] * len(saes))[i]
            runs.append(_result(member, data, sae_trainer, tensors["losses"], {
                "lr": cfg["lr"], "warmup": cfg["warmup"], "per_epoch": per_epoch,
                "total": cfg["total"], "n_latents": cfg["n_latents"],
                "rows_seen": int(doc["rows_seen"]), "seconds": float(doc["seconds"]),
                "resumed_from_step": resumed, "device": str(device), "workers": world,
                "time_split": metrics.get("time_split")}))
    tops = top_activations_each([(t.sae, r, m.params) for (m, _), (t, r) in
                                 zip(members, runs)], ctx.store, layer)
    results = []
    for (member, file), (sae_trainer, result), top in zip(members, runs, tops):
        result["top_activations"] = top
        result["splice"] = member._splice(sae_trainer.sae, ctx, layer)
        result["weights_path"] = result["config_path"] = result["saelens_path"] = None
        if ctx.out_dir is not None and member.params.save_weights:
            member._save(sae_trainer.sae, ctx, layer, result, file)
        results.append(json_safe(result))
    where.remove(name)
    return results if sweep is not None else results[0]


class RayTrainStorage:
    """Where Ray Train keeps a fit's checkpoints: a local directory, or an ``s3://`` prefix
    (through pyarrow's S3 filesystem, on the store's endpoint when the store is on S3)."""

    def __init__(self, root: Any, store: Any):
        self.filesystem: Any = None
        if str(root).startswith("s3://"):
            from pyarrow import fs

            from mechray.storage.s3 import parse_uri

            bucket, prefix = parse_uri(str(root))
            endpoint = getattr(store, "endpoint_url", None) if getattr(store, "is_s3", False) \
                else None
            kw: dict[str, Any] = {"region": getattr(store, "region", None) or "us-east-1"}
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            self.filesystem = fs.S3FileSystem(**kw)
            self.path = "/".join(x for x in (bucket, prefix.strip("/"), "sae", "ray_train") if x)
        else:
            self.path = str((Path(root) / "sae" / "ray_train").resolve())

    def remove(self, name: str) -> None:
        """Delete the run's checkpoints (the fit finished)."""
        if self.filesystem is None:
            shutil.rmtree(Path(self.path) / name, ignore_errors=True)
            return
        try:
            self.filesystem.delete_dir(f"{self.path}/{name}")
        except OSError as exc:
            log.warning("sae: Ray Train checkpoints s3://%s/%s not removed (%s)", self.path, name,
                        exc)


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


def _result(analysis: "SAEAnalysis", data: LayerRows, trainer: SAETrainer,
            losses: torch.Tensor, run: dict[str, Any]) -> tuple[SAETrainer, dict[str, Any]]:
    """The single-process result layout (``sae.fit``) for an SAE trained on workers, before its
    top-activating rows, splice and files."""
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
    log.info("sae %s: explained variance %.3f, l0 %.1f (%d steps on %d workers, %.1fs)",
             data.layer, result["explained_variance"], result["l0"], trainer.n_steps,
             run["workers"], run["seconds"])
    return trainer, result


def memory_per_worker(d: int, n_latents: int, batch_size: int, workers: int = 1) -> int:
    """Bytes of float32 training state one worker holds (module docstring): weights, gradients,
    Adam's moments and the all-reduce buffer (``40 * n_latents * d``) and one step's
    pre-activations and codes (``8 * batch_size / workers * n_latents``); not the shuffle
    buffer (``buffer_mb``)."""
    return 40 * n_latents * d + 8 * math.ceil(batch_size / workers) * n_latents
