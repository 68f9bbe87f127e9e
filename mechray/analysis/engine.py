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
   in-process runs merge in the same order and agree exactly.
2. ``fit`` analyses: one task per (layer, analysis), submitted together with the stat tasks,
   requesting ``num_gpus`` when configured.
3. ``model`` analyses: after 1-2 (they read earlier results, e.g. ``neuron`` means), one task per
   (layer, analysis) with the model ``ray.put`` once (in the driver if the model cannot be
   serialised), one analysis after another in the requested order.

Tasks get the store's location string and reopen it (cached per worker process), so nothing but
paths and small manifests travel; S3 shards are read straight into the task's memory.
``map`` receives the manifest entry plus this layer's
``row_steps`` / ``row_positions`` (int64 tensors from the shard's metadata).  Files an analysis
writes into ``ctx.out_dir`` are written by the task into a private directory and shipped back to
the driver's ``out_dir`` (same relative paths), so a multi-node cluster needs no shared disk.

An analysis that raises :class:`Skip`, needs a model that was not given, or fails is recorded as
``{"skipped": True, "reason": ...}`` (plus ``"error"`` for failures) for that layer; a missing
or corrupt shard raises :class:`~mechray.storage.reader.ShardError` naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

from mechray.analysis.base import (
    Analysis,
    AnalysisParamsError,
    Context,
    Skip,
    analysis_class,
)
from mechray.storage.reader import ShardError, ShardStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """One requested analysis. The class travels with it, so Ray workers need no registry
    (an analysis registered in a notebook or a test module runs in tasks too)."""

    name: str
    kind: str
    params: dict
    cls: type[Analysis]

    def build(self) -> Analysis:
        return self.cls(self.params)


class Status(Enum):
    OK = "ok"          # ``value`` is the partial statistic or the result
    SKIP = "skip"      # the analysis cannot run here (Skip): ``value`` is the reason
    ERROR = "error"    # the analysis raised: ``value`` is "Type: message"
    FATAL = "fatal"    # the store is broken (ShardError): the run stops, ``value`` says why


@dataclass(frozen=True)
class Outcome:
    """What one step (map, merge, finalize, fit, run) of one analysis gave."""

    status: Status
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@dataclass
class TaskResult:
    """What a finalize/fit/model task sends back: the layer's result, the files it wrote (relative
    path -> bytes, for the driver's ``out_dir``) and, when the store is broken, why."""

    result: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    fatal: Optional[str] = None


class Shipped(NamedTuple):
    """The model and eval inputs as tasks receive them: object refs when ``remote``, else the
    objects themselves (fits and model analyses then run in the driver)."""

    model: Any
    eval_data: Any
    remote: bool


@dataclass(frozen=True)
class StoreRef:
    """What a task needs to reopen a store (S3 downloads go to the driver's cache directory)."""

    location: str
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    cache_dir: Optional[str] = None

    @classmethod
    def of(cls, store: ShardStore) -> "StoreRef":
        cache = str(store.cache_dir) if store.cache_dir is not None else None
        return cls(store.location, store.endpoint_url, store.region, cache)


class Engine:
    """Runs registered analyses over one store (see the module docstring for the plan)."""

    def __init__(self, store: ShardStore | str, *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, out_dir: Optional[str | os.PathLike] = None,
                 use_ray: Optional[bool] = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 progress: bool = True, seed: int = 0, device: str = "cpu", strict: bool = False,
                 shards_per_task: Optional[int] = None):
        if isinstance(store, ShardStore):
            self.ref = StoreRef.of(store)
            _STORES[self.ref] = store
        else:
            self.ref = StoreRef(str(store), endpoint_url, region)
        self.store = _open(self.ref)
        self.out_dir = Path(out_dir) if out_dir is not None else None
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
    def run(self, names: list[str], params: Optional[dict[str, dict]] = None, *,
            layers: Optional[list[str]] = None, model: Optional[torch.nn.Module] = None,
            eval_data: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Run ``names`` on ``layers`` (default: every captured layer); see the module docstring."""
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
                cls(params.get(name))  # validates the parameters before any task starts
                specs.append(Spec(name, cls.kind, dict(params.get(name) or {}), cls))
            except AnalysisParamsError:
                raise
            except KeyError as exc:  # not registered in this install
                results[name] = {lay: _skipped(str(exc.args[0])) for lay in layers}
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
            ray.get(_remote(_loads).options(num_cpus=0).remote(*refs))  # workers can rebuild it
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
                parts = [call(_map_shards, self.ref, [dict(e) for e in group], layer, stats)
                         for group in groups[layer]]
                maps += parts
                root = _tree(parts, lambda *some: call(_merge_many, stats, *some, count=False))
                for spec in stats:
                    jobs.append((spec.name, layer,
                                 call(_finalize, spec, self.ref, layer, root, info)))
            for spec in fits:
                jobs.append((spec.name, layer, fit_call(_fit, spec, self.ref, layer, gpu_info,
                                                        shipped.model, shipped.eval_data,
                                                        gpu=True)))
        self._collect(jobs, results, maps, bar)

    def _models(self, spec: Spec, layers: list[str], results: dict, shipped: Shipped,
                no_model: bool) -> None:
        if no_model:
            for layer in layers:
                results[spec.name][layer] = _skipped(
                    f"{spec.name!r} needs the model: pass it to EvalMechIntRunner(model, config) "
                    "or `mechray analyze --model module:Class --model-checkpoint PATH`")
            return
        bar = self._bar(len(layers), spec.name)
        call = self._submitter(bar) if shipped.remote else _Local(bar)
        info = self._put(self._ctx_info(results, gpu=True)) if shipped.remote else \
            self._ctx_info(results, gpu=True)
        jobs = [(spec.name, layer, call(_run_model, spec, self.ref, layer, info, shipped.model,
                                        shipped.eval_data, gpu=True)) for layer in layers]
        self._collect(jobs, results, [], bar)

    # --- plumbing ------------------------------------------------------------------------------
    def _ctx_info(self, results: dict, gpu: bool = False) -> dict[str, Any]:
        done = {n: dict(v) for n, v in results.items() if v}
        device = "cuda" if gpu and self.num_gpus else self.device
        return {"results": done, "seed": self.seed, "device": device, "strict": self.strict,
                "collect_files": self.out_dir is not None,
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

        def submit(fn, *args, gpu: bool = False, count: bool = True):
            # SPREAD: a cluster's nodes share the shards; a node lost mid-run costs only its
            # tasks, which Ray retries elsewhere (max_retries=3 by default).
            opts: dict[str, Any] = {"num_cpus": self.num_cpus, "scheduling_strategy": "SPREAD"}
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


# --- tasks (plain functions: called directly, or wrapped with ray.remote) ----------------------
TASK_BYTES = 64 << 20   # shard bytes per map task (consecutive shards grouped up to this)
MIN_TASKS = 32          # ... but at least this many map tasks per layer when there are shards


def shard_groups(entries: list[dict], per_task: Optional[int] = None) -> list[list[dict]]:
    """Consecutive shards per map task: ``per_task`` each, or about :data:`TASK_BYTES` each
    while that leaves at least :data:`MIN_TASKS` tasks (fewer, bigger tasks cost less overhead;
    enough of them keep every worker busy).  Depends only on ``entries``."""
    if not entries:
        return []
    if per_task is None:
        mean = max(1, sum(int(e.get("bytes", 0)) for e in entries) // len(entries))
        per_task = max(1, min(TASK_BYTES // mean, -(-len(entries) // MIN_TASKS)))
    return [entries[i:i + per_task] for i in range(0, len(entries), per_task)]


def _map_shards(ref: StoreRef, entries: list[dict], layer: str,
                specs: list[Spec]) -> dict[str, Outcome]:
    """``map`` of every spec over consecutive shards (the next read ahead), merged in order."""
    store = _open(ref)
    out: Optional[dict[str, Outcome]] = None
    reading = store.payloads(entries)
    try:
        for _ in entries:
            try:
                got, payload = next(reading)
            except ShardError as exc:
                return {s.name: Outcome(Status.FATAL, str(exc)) for s in specs}
            part = _map_payload(got, payload, layer, specs)
            out = part if out is None else _merge_all(specs, out, part)
            if any(o.status is Status.FATAL for o in out.values()):
                break
    finally:
        reading.close()          # stops the read-ahead thread, drops what it read
    assert out is not None
    return out


def _map_payload(entry: dict, payload: dict, layer: str, specs: list[Spec]) -> dict[str, Outcome]:
    try:
        rows = payload["activations"][layer]
    except KeyError:
        return {s.name: Outcome(Status.FATAL, f"shard {entry['file']} lists layer {layer!r} in "
                                "the manifest but does not hold it: the shard was replaced; "
                                "re-capture it") for s in specs}
    meta = payload.get("metadata", {})
    entry = dict(entry, row_steps=meta.get("row_steps", {}).get(layer),
                 row_positions=meta.get("row_positions", {}).get(layer))
    out = {}
    for spec in specs:
        out[spec.name] = _guarded(lambda: spec.build().map(rows, entry, layer), spec, layer, {})
    return out


def _merge_all(specs: list[Spec], a: dict[str, Outcome],
               b: dict[str, Outcome]) -> dict[str, Outcome]:
    out = {}
    for spec in specs:
        pa, pb = a[spec.name], b[spec.name]
        if not pa.ok or not pb.ok:  # fatal wins, then the first problem
            first_bad = pa if pa.status is Status.FATAL or (
                pb.status is not Status.FATAL and not pa.ok) else pb
            out[spec.name] = first_bad
            continue
        out[spec.name] = _guarded(lambda: spec.build().merge(pa.value, pb.value), spec, "", {})
    return out


def _merge_many(specs: list[Spec], *parts: dict[str, Outcome]) -> dict[str, Outcome]:
    """Fold neighbouring partials left to right (one task where Ray runs the tree)."""
    out = parts[0]
    for part in parts[1:]:
        out = _merge_all(specs, out, part)
    return out


def _finalize(spec: Spec, ref: StoreRef, layer: str, root: dict[str, Outcome],
              info: dict) -> TaskResult:
    merged = root[spec.name]
    if not merged.ok:
        return _task_result(merged)
    return _with_ctx(spec, ref, layer, info, None, None,
                     lambda a, ctx: a.finalize(merged.value, ctx, layer))


def _fit(spec: Spec, ref: StoreRef, layer: str, info: dict, model, eval_data) -> TaskResult:
    return _with_ctx(spec, ref, layer, info, model, eval_data, lambda a, ctx: a.fit(ctx, layer))


def _run_model(spec: Spec, ref: StoreRef, layer: str, info: dict, model,
               eval_data) -> TaskResult:
    return _with_ctx(spec, ref, layer, info, model, eval_data, lambda a, ctx: a.run(ctx, layer))


def _loads(model, eval_data) -> bool:
    return True


def _with_ctx(spec: Spec, ref: StoreRef, layer: str, info: dict, model, eval_data,
              body: Callable[[Analysis, Context], dict]) -> TaskResult:
    """Run ``body(analysis, ctx)`` with a private out_dir and collect the files it wrote."""
    store = _open(ref)
    try:
        store.refresh()
        if store.is_s3 and _reads_store(spec):
            _prefetch(store, layer)  # one download per shard per node, under a file lock
    except ShardError as exc:
        return TaskResult(fatal=str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="mechray-task-")) if info["collect_files"] else None
    device = info["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    ctx = Context(store=store, model=model, eval_data=eval_data, out_dir=tmp,
                  results=info["results"], device=device, seed=info["seed"],
                  progress=info.get("progress", False))
    try:
        with model_lock(model):  # hooks of concurrent analyses on one model would interfere
            outcome = _guarded(lambda: body(spec.build(), ctx), spec, layer, info)
        files = {} if tmp is None else {str(p.relative_to(tmp)): p.read_bytes()
                                        for p in sorted(tmp.rglob("*")) if p.is_file()}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    task = _task_result(outcome)
    task.files = files
    return task


def _guarded(body: Callable[[], Any], spec: Spec, layer: str, info: dict) -> Outcome:
    try:
        return Outcome(Status.OK, body())
    except Skip as exc:
        return Outcome(Status.SKIP, str(exc))
    except ShardError as exc:
        return Outcome(Status.FATAL, str(exc))
    except Exception as exc:
        if info.get("strict"):
            raise
        log.error("mechray: analysis %r failed on layer %r:\n%s", spec.name, layer,
                  traceback.format_exc())
        return Outcome(Status.ERROR, f"{type(exc).__name__}: {exc}")


def _task_result(outcome: Outcome) -> TaskResult:
    if outcome.status is Status.OK:
        return TaskResult(result=outcome.value)
    if outcome.status is Status.FATAL:
        return TaskResult(fatal=outcome.value)
    if outcome.status is Status.SKIP:
        return TaskResult(result=_skipped(outcome.value))
    return TaskResult(result={**_skipped(f"failed: {outcome.value}"), "error": outcome.value})


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": True, "reason": reason}


MERGE_FAN_IN = 8        # partials folded per merge task: 32 groups take 5 merge tasks, not 31


def _tree(parts: list, merge: Callable, fan_in: int = MERGE_FAN_IN) -> Any:
    """Merge in a fixed shape (shard order), the same with and without Ray: each ``merge`` call
    folds up to ``fan_in`` neighbouring partials left to right, level by level."""
    if not parts:
        raise ValueError("no shards to merge")
    while len(parts) > 1:
        parts = [merge(*parts[i:i + fan_in]) if len(parts[i:i + fan_in]) > 1 else parts[i]
                 for i in range(0, len(parts), fan_in)]
    return parts[0]


class _Local:
    """The in-process submitter: runs each task at once, in submission order."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, fn, *args, gpu: bool = False, count: bool = True):
        out = fn(*args)
        if count:
            self.bar.update(1)
        return out


_STORES: dict[StoreRef, ShardStore] = {}
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = \
    weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: Optional[torch.nn.Module]):
    """One lock per model object: analyses that hook the same in-process model (concurrent API
    requests, say) take turns; without a model, a no-op."""
    if model is None:
        return contextlib.nullcontext()
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())
_REMOTES: dict[Callable, Any] = {}


def _open(ref: StoreRef) -> ShardStore:
    """A cached store per process (keeps verified checksums); tasks pass entries, not names."""
    if ref not in _STORES:
        _STORES[ref] = ShardStore(ref.location, endpoint_url=ref.endpoint_url, region=ref.region,
                                  cache_dir=ref.cache_dir)
    return _STORES[ref]


def _reads_store(spec: Spec) -> bool:
    """Whether the spec's finalize/fit/run reads shards (an analysis may say it does not with a
    ``reads_store(params) -> bool`` classmethod; stat analyses such as ``neuron`` need only
    their merged partial, so their S3 shards are not downloaded into the cache)."""
    says = getattr(spec.cls, "reads_store", None)
    return True if says is None else bool(says(spec.params))


def _prefetch(store: ShardStore, layer: str) -> None:
    for entry in store.shards(layer):
        locked_path(store, entry)


def locked_path(store: ShardStore, entry: dict) -> Path:
    """``store.path(entry)`` with an exclusive file lock, so tasks on one node download once."""
    if not store.is_s3:
        return store.path(entry)
    import fcntl

    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / f".{entry['file']}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return store.path(entry)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
