"""Running analyses over a store: fanned out as Ray tasks, or the same steps in one process.

Usage::

    from mechray.analysis.engine import Engine

    engine = Engine("s3://bucket/exp001", endpoint_url="http://127.0.0.1:9000", out_dir="results")
    results = engine.run(["neuron", "feature", "sae"], params={"sae": {"k": 16}},
                         model=model, eval_data=inputs)
    results["neuron"]["popt"]["mean"]                 # {analysis: {layer: JSON-safe dict}}

The plan, identical with and without Ray (Ray is used when ``ray.is_initialized()`` unless
``use_ray`` says otherwise):

1. ``stat`` analyses: one task per (layer, group of consecutive shards) loads each shard once
   (the next one read ahead in a thread while the current one is mapped), ``map``s every stat
   analysis on that layer's rows and merges the group's partials in shard order; the groups'
   partials are merged in a fixed tree (group order, up to 8 per merge task), then one task per (layer,
   analysis) runs ``finalize`` (which may stream the store again, e.g. k-means in ``feature``).
   Groups (:func:`shard_groups`) depend only on the shard list, never on the cluster, so Ray and
   in-process runs merge in the same order; products go through single-threaded BLAS
   (:func:`~mechray.analysis.moments.single_threaded_blas`), so they agree bit for bit whatever
   the process, thread count or BLAS kernel.
2. ``fit`` analyses: one task per (layer, analysis), submitted together with the stat tasks,
   requesting ``num_gpus`` when configured.
3. ``model`` analyses: after 1-2 (they read earlier results, e.g. ``neuron`` means), one task per
   (layer, analysis) with the model ``ray.put`` once (in the driver if the model cannot be
   serialised), one analysis after another in the requested order.

Tasks get the store's location string and reopen it (cached per worker process), so nothing but
paths and small manifests travel; S3 shards are read straight into the task's memory.
``map`` receives the manifest entry plus this layer's
``row_steps`` / ``row_positions`` (int64 tensors from the shard's metadata).
``skip_token_ids`` (from :func:`mechray.analysis.special.analysis_token_ids`) leaves the rows of
those tokens ([CLS], [SEP], BOS, EOS, PAD) out of every analysis; ``map`` then also gets the kept
rows' shard indices as ``row_index``.  Files an analysis
writes into ``ctx.out_dir`` are written by the task into a private directory and shipped back to
the driver's ``out_dir`` (same relative paths), so a multi-node cluster needs no shared disk.
Resumable fit checkpoints (``sae``) are written straight to ``checkpoint_dir`` (a directory or
an ``s3://`` URI; default: for a store on S3 ``s3://<bucket>/<prefix>.checkpoints``, else
``out_dir``, else ``<store>.checkpoints`` beside the store), where a rerun of the same command
finds them; a local directory on a multi-node cluster is per node unless it is on a shared
filesystem.

An analysis that raises :class:`Skip`, needs a model that was not given, or fails is recorded as
``{"skipped": True, "reason": ...}`` (plus ``"error"`` for failures) for that layer; a missing
or corrupt shard raises :class:`~mechray.storage.reader.ShardError` naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from mechray.analysis.base import AnalysisParamsError, analysis_class
from mechray.analysis.tasks import (
    MIN_TASKS,
    STORES,
    TASK_BYTES,
    Shipped,
    Spec,
    StoreRef,
    checkpoint_beside,
    finalize,
    fit,
    loads,
    map_shards,
    merge_many,
    open_store,
    run_model,
    shard_groups,
    skipped,
    tree,
)
from mechray.storage.reader import ShardError, ShardStore

log = logging.getLogger(__name__)


class Engine:
    """Runs registered analyses over one store (see the module docstring for the plan)."""

    def __init__(self, store: ShardStore | str, *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, out_dir: Optional[str | os.PathLike] = None,
                 use_ray: Optional[bool] = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 progress: bool = True, seed: int = 0, device: str = "cpu", strict: bool = False,
                 shards_per_task: Optional[int] = None,
                 checkpoint_dir: Optional[str | os.PathLike] = None,
                 skip_token_ids: Sequence[int] = ()):
        skip = tuple(sorted({int(i) for i in skip_token_ids}))   # analysis/special.py
        if isinstance(store, ShardStore):
            self.ref = dataclasses.replace(StoreRef.of(store), skip_tokens=skip)
            STORES[self.ref] = store
        else:
            self.ref = StoreRef(str(store), endpoint_url, region, skip_tokens=skip)
        self.store = open_store(self.ref)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # resumable fit checkpoints: where a rerun of the same command finds them
        # (an s3:// URI, or None for a store on S3: its S3 prefix, where every node finds them)
        where = checkpoint_dir if checkpoint_dir is not None else \
            None if self.store.is_s3 else self.out_dir
        self.checkpoint_dir: Optional[Path | str] = \
            str(where) if str(where).startswith("s3://") else \
            Path(where).resolve() if where is not None else \
            None if self.store.is_s3 else checkpoint_beside(self.store)
        self.use_ray = _ray_ready() if use_ray is None else use_ray
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.progress, self.seed, self.device, self.strict = progress, seed, device, strict
        if shards_per_task is not None and shards_per_task < 1:
            raise ValueError(f"shards_per_task={shards_per_task}: give 1 or more, or None for "
                             f"groups of about {TASK_BYTES >> 20} MB (at least {MIN_TASKS} tasks)")
        self.shards_per_task = shards_per_task
        if self.use_ray and num_gpus:
            import ray

            have = ray.cluster_resources().get("GPU", 0)
            if have < num_gpus:
                raise ValueError(f"num_gpus={num_gpus} per analysis task but the Ray cluster has "
                                 f"{have} GPU(s); set analysis_num_gpus=0 or add GPU nodes")

    # ------------------------------------------------------------------------------------------
    def run(self, names: list[str], params: Optional[Mapping[str, Any]] = None, *,
            layers: Optional[list[str]] = None, model: Optional[torch.nn.Module] = None,
            eval_data: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Run ``names`` on ``layers`` (default: every captured layer); see the module docstring.

        ``params[name]`` is a dict, validated here once, or the analysis's ``Params`` instance
        (taken as it is); every task receives that one validated object."""
        params = params or {}
        self.store.refresh()
        known = self.store.layers()
        for layer in layers or []:
            self.store.check_layer(layer)
        layers = list(layers or known)
        results: dict[str, dict[str, dict]] = {n: {} for n in dict.fromkeys(names)}
        specs: list[Spec] = []
        for name in results:
            try:
                cls = analysis_class(name)
                valid = cls.validate_params(params.get(name))  # once, before any task starts
                specs.append(Spec(name, cls.kind, valid, cls, self.strict))
            except AnalysisParamsError:
                raise
            except KeyError as exc:  # not registered in this install
                results[name] = {lay: skipped(str(exc.args[0])) for lay in layers}
        log.info("mechray: %d analysis(es) x %d layer(s) over %d shard(s) %s", len(specs),
                 len(layers), len(self.store.shards()),
                 "with Ray" if self.use_ray else "in-process")
        shipped = self._ship(model, eval_data, any(s.kind != "stat" for s in specs))
        self._stats_and_fits(specs, layers, results, shipped)
        for spec in (s for s in specs if s.kind == "model"):
            self._models(spec, layers, results, shipped, model is None)
        return results

    # --- phases --------------------------------------------------------------------------------
    def _ship(self, model, eval_data, needed: bool) -> Shipped:
        """Object refs for Ray tasks, or the objects themselves (see :class:`Shipped`)."""
        if not self.use_ray or not needed or (model is None and eval_data is None):
            return Shipped(model, eval_data, self.use_ray)
        import ray

        try:
            refs = (None if model is None else ray.put(model),
                    None if eval_data is None else ray.put(eval_data))
            ray.get(_remote(loads).options(num_cpus=0).remote(*refs))  # workers can rebuild it
            return Shipped(*refs, remote=True)
        except Exception as exc:  # unpicklable, or its class is not importable on the workers
            log.warning("mechray: the model cannot be sent to Ray tasks (%s); fits and model "
                        "analyses run in the driver", str(exc).strip().splitlines()[-1])
            return Shipped(model, eval_data, False)

    def _stats_and_fits(self, specs: list[Spec], layers: list[str], results: dict,
                        shipped: Shipped) -> None:
        stats = [s for s in specs if s.kind == "stat"]
        fits = [s for s in specs if s.kind == "fit"]
        if not stats and not fits:
            return
        groups = {layer: shard_groups(self.store.shards(layer), self.shards_per_task)
                  for layer in layers}
        total = sum(len(groups[la]) + len(stats) for la in layers) * bool(stats) + \
            len(layers) * len(fits)
        bar = self._bar(total, "stats+fits")
        call = self._submitter(bar)
        fit_call = call if shipped.remote else _Local(bar)
        info, gpu_info = self._put(self._ctx_info(results)), self._ctx_info(results, gpu=True)
        gpu_info = self._put(gpu_info) if shipped.remote else gpu_info
        jobs: list[tuple[str, str, Any]] = []      # (analysis, layer, handle of the outcome)
        maps = []
        for layer in layers:
            if stats:
                parts = [call(map_shards, self.ref, [dict(e) for e in group], layer, stats)
                         for group in groups[layer]]
                maps += parts
                root = tree(parts, lambda *some: call(merge_many, stats, *some, count=False))
                for spec in stats:
                    jobs.append((spec.name, layer,
                                 call(finalize, spec, self.ref, layer, root, info)))
            for spec in fits:
                jobs.append((spec.name, layer, fit_call(
                    fit, spec, self.ref, layer, gpu_info, shipped.model, shipped.eval_data,
                    gpu=True, cpus=spec.cls.task_cpus(spec.params, self.num_cpus))))
        self._collect(jobs, results, maps, bar)

    def _models(self, spec: Spec, layers: list[str], results: dict, shipped: Shipped,
                no_model: bool) -> None:
        if no_model:
            for layer in layers:
                results[spec.name][layer] = skipped(
                    f"{spec.name!r} needs the model: pass it to EvalMechIntRunner(model, config) "
                    "or `mechray analyze --model module:Class --model-checkpoint PATH`")
            return
        bar = self._bar(len(layers), spec.name)
        call = self._submitter(bar) if shipped.remote else _Local(bar)
        info = self._put(self._ctx_info(results, gpu=True)) if shipped.remote else \
            self._ctx_info(results, gpu=True)
        jobs = [(spec.name, layer, call(run_model, spec, self.ref, layer, info, shipped.model,
                                        shipped.eval_data, gpu=True)) for layer in layers]
        self._collect(jobs, results, [], bar)

    # --- plumbing ------------------------------------------------------------------------------
    def _ctx_info(self, results: dict, gpu: bool = False) -> dict[str, Any]:
        done = {n: dict(v) for n, v in results.items() if v}
        device = "cuda" if gpu and self.num_gpus else self.device
        return {"results": done, "seed": self.seed, "device": device, "strict": self.strict,
                "collect_files": self.out_dir is not None,
                "checkpoint_dir": None if self.checkpoint_dir is None else
                str(self.checkpoint_dir),
                "progress": self.progress and not self.use_ray}

    def _put(self, value: Any) -> Any:
        """One object-store copy shared by many tasks (the value itself without Ray)."""
        if not self.use_ray:
            return value
        import ray

        return ray.put(value)

    def _bar(self, total: int, what: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"mechray {what}", unit="task", disable=not self.progress,
                    leave=False)

    def _submitter(self, bar) -> Callable:
        if not self.use_ray:
            return _Local(bar)

        def submit(fn, *args, gpu: bool = False, count: bool = True,
                   cpus: Optional[float] = None):
            # SPREAD: a cluster's nodes share the shards; a node lost mid-run costs only its
            # tasks, which Ray retries elsewhere (max_retries=3 by default).
            opts: dict[str, Any] = {"num_cpus": self.num_cpus if cpus is None else cpus,
                                    "scheduling_strategy": "SPREAD"}
            if gpu and self.num_gpus:
                opts["num_gpus"] = self.num_gpus
            return _remote(fn).options(**opts).remote(*args)
        return submit

    def _collect(self, jobs: list, results: dict, maps: list, bar) -> None:
        """Wait for every task (progress bar), then store results and write shipped files."""
        values = [h for *_, h in jobs]
        with bar:
            if self.use_ray:
                import ray

                pending = [h for h in list(maps) + values if isinstance(h, ray.ObjectRef)]
                while pending:
                    done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2,
                                             fetch_local=False)
                    bar.update(len(done))
                values = [ray.get(h) if isinstance(h, ray.ObjectRef) else h for h in values]
        for (name, layer, _), task in zip(jobs, values):
            if task.fatal:
                raise ShardError(task.fatal)
            for rel, data in task.files.items():
                path = self.out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            results[name][layer] = task.result


class _Local:
    """The in-process submitter: runs each task at once, in submission order."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, fn, *args, gpu: bool = False, count: bool = True,
                 cpus: Optional[float] = None):
        out = fn(*args)
        if count:
            self.bar.update(1)
        return out


_REMOTES: dict[Callable, Any] = {}


def _remote(fn: Callable):
    if fn not in _REMOTES:
        import ray

        _REMOTES[fn] = ray.remote(fn)
    return _REMOTES[fn]


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()
