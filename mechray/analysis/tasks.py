"""The engine's tasks and the types they pass: plain functions the :class:`~mechray.analysis.
engine.Engine` calls in-process or wraps with ``ray.remote``.

Usage (what the engine does for one layer of ``stat`` analyses)::

    from mechray.analysis.tasks import Spec, StoreRef, shard_groups, map_shards, merge_many, tree

    parts = [map_shards(ref, group, "popt", specs) for group in shard_groups(entries)]
    root = tree(parts, lambda *some: merge_many(specs, *some))   # the same shape with Ray
    result = finalize(specs[0], ref, "popt", root, info)

Each step returns an :class:`Outcome` per analysis (ok, skip, error, or fatal for a broken
store); ``finalize``/``fit``/``run_model`` return a :class:`TaskResult` with the files they
wrote, so a multi-node cluster needs no shared disk.  Stores are reopened per worker process
from a :class:`StoreRef` and cached (:func:`open_store`).
"""

from __future__ import annotations

import contextlib
import logging
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
from pydantic import BaseModel

from mechray.analysis.base import Analysis, Context, Skip
from mechray.analysis.special import filtered
from mechray.storage.reader import ShardError, ShardStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    """One requested analysis. The class travels with it, so Ray workers need no registry
    (an analysis registered in a notebook or a test module runs in tasks too), and so do its
    parameters, validated once by the engine: ``params`` is the class's ``Params`` instance,
    which tasks hand to the analysis as it is (never validated again per shard, merge or
    finalize; unpickling a pydantic model does not validate either)."""

    name: str
    kind: str
    params: BaseModel
    cls: type[Analysis]
    strict: bool = False    # a failure raises (Engine(strict=True)) instead of skipping the layer

    def build(self) -> Analysis:
        """The analysis over the validated ``params`` (built once per task)."""
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
    skip_tokens: tuple[int, ...] = ()   # rows of these token ids left out (analysis/special.py)

    @classmethod
    def of(cls, store: ShardStore) -> "StoreRef":
        cache = str(store.cache_dir) if store.cache_dir is not None else None
        return cls(store.location, store.endpoint_url, store.region, cache)


TASK_BYTES = 64 << 20   # shard bytes per map task (consecutive shards grouped up to this)
MIN_TASKS = 16          # ... but at least this many map tasks per layer when there are shards


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


def map_shards(ref: StoreRef, entries: list[dict], layer: str,
                specs: list[Spec]) -> dict[str, Outcome]:
    """``map`` of every spec over consecutive shards (the next read ahead), merged in order."""
    store = rows_store(ref)
    out: Optional[dict[str, Outcome]] = None
    built = _built(specs)
    reading = store.payloads(entries)
    try:
        for _ in entries:
            try:
                got, payload = next(reading)
            except ShardError as exc:
                return {s.name: Outcome(Status.FATAL, str(exc)) for s in specs}
            part = _map_payload(got, payload, layer, specs, built)
            out = part if out is None else merge_all(specs, out, part, built)
            if any(o.status is Status.FATAL for o in out.values()):
                break
    finally:
        reading.close()          # stops the read-ahead thread, drops what it read
    assert out is not None
    return out


def _built(specs: list[Spec]) -> dict[str, Analysis]:
    """Each spec's analysis, built once for a task's shards or merges."""
    return {spec.name: spec.build() for spec in specs}


def _map_payload(entry: dict, payload: dict, layer: str, specs: list[Spec],
                 built: dict[str, Analysis]) -> dict[str, Outcome]:
    try:
        rows = payload["activations"][layer]
    except KeyError:
        return {s.name: Outcome(Status.FATAL, f"shard {entry['file']} lists layer {layer!r} in "
                                "the manifest but does not hold it: the shard was replaced; "
                                "re-capture it") for s in specs}
    meta = payload.get("metadata", {})
    entry = dict(entry, row_steps=meta.get("row_steps", {}).get(layer),
                 row_positions=meta.get("row_positions", {}).get(layer),
                 row_index=(meta.get("row_index") or {}).get(layer))
    out = {}
    for spec in specs:
        out[spec.name] = _guarded(lambda: built[spec.name].map(rows, entry, layer), spec, layer,
                                  {})
    return out


def merge_all(specs: list[Spec], a: dict[str, Outcome], b: dict[str, Outcome],
              built: Optional[dict[str, Analysis]] = None) -> dict[str, Outcome]:
    built = _built(specs) if built is None else built
    out = {}
    for spec in specs:
        pa, pb = a[spec.name], b[spec.name]
        if not pa.ok or not pb.ok:  # fatal wins, then the first problem
            first_bad = pa if pa.status is Status.FATAL or (
                pb.status is not Status.FATAL and not pa.ok) else pb
            out[spec.name] = first_bad
            continue
        out[spec.name] = _guarded(lambda: built[spec.name].merge(pa.value, pb.value), spec, "",
                                  {})
    return out


def merge_many(specs: list[Spec], *parts: dict[str, Outcome]) -> dict[str, Outcome]:
    """Fold neighbouring partials left to right (one task where Ray runs the tree)."""
    out, built = parts[0], _built(specs)
    for part in parts[1:]:
        out = merge_all(specs, out, part, built)
    return out


def finalize(spec: Spec, ref: StoreRef, layer: str, root: dict[str, Outcome],
              info: dict) -> TaskResult:
    merged = root[spec.name]
    if not merged.ok:
        return _task_result(merged)
    return _with_ctx(spec, ref, layer, info, None, None,
                     lambda a, ctx: a.finalize(merged.value, ctx, layer))


def fit(spec: Spec, ref: StoreRef, layer: str, info: dict, model, eval_data) -> TaskResult:
    return _with_ctx(spec, ref, layer, info, model, eval_data, lambda a, ctx: a.fit(ctx, layer))


def run_model(spec: Spec, ref: StoreRef, layer: str, info: dict, model,
               eval_data) -> TaskResult:
    return _with_ctx(spec, ref, layer, info, model, eval_data, lambda a, ctx: a.run(ctx, layer))


def loads(model, eval_data) -> bool:
    return True


def _with_ctx(spec: Spec, ref: StoreRef, layer: str, info: dict, model, eval_data,
              body: Callable[[Analysis, Context], dict]) -> TaskResult:
    """Run ``body(analysis, ctx)`` with a private out_dir and collect the files it wrote;
    checkpoints go to ``info["checkpoint_dir"]`` (the results directory), where a rerun of
    the same command finds them."""
    store = open_store(ref)
    try:
        store.refresh()
        if store.is_s3 and reads_store(spec):
            prefetch(store, layer)  # one download per shard per node, under a file lock
    except ShardError as exc:
        return TaskResult(fatal=str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="mechray-task-")) if info["collect_files"] else None
    device = info["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    where = info.get("checkpoint_dir")
    ctx = Context(store=filtered(store, ref.skip_tokens), model=model, eval_data=eval_data, out_dir=tmp,
                  results=info["results"], device=device, seed=info["seed"],
                  progress=info.get("progress", False),
                  checkpoint_dir=None if not where else where if where.startswith("s3://")
                  else Path(where))
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


def checkpoint_beside(store: ShardStore) -> Path:
    """Where fits keep resumable checkpoints when there is no results directory: a sibling of
    the store's local directory (of its download cache for S3), ``<store>.checkpoints``."""
    root = Path(store.root)
    return root.with_name(f"{root.name}.checkpoints")


def _guarded(body: Callable[[], Any], spec: Spec, layer: str, info: dict) -> Outcome:
    try:
        return Outcome(Status.OK, body())
    except Skip as exc:
        return Outcome(Status.SKIP, str(exc))
    except ShardError as exc:
        return Outcome(Status.FATAL, str(exc))
    except Exception as exc:
        if spec.strict or info.get("strict"):
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
        return TaskResult(result=skipped(outcome.value))
    return TaskResult(result={**skipped(f"failed: {outcome.value}"), "error": outcome.value})


def skipped(reason: str) -> dict[str, Any]:
    return {"skipped": True, "reason": reason}


MERGE_FAN_IN = 8        # partials folded per merge task: 32 groups take 5 merge tasks, not 31


def tree(parts: list, merge: Callable, fan_in: int = MERGE_FAN_IN) -> Any:
    """Merge in a fixed shape (shard order), the same with and without Ray: each ``merge`` call
    folds up to ``fan_in`` neighbouring partials left to right, level by level."""
    if not parts:
        raise ValueError("no shards to merge")
    while len(parts) > 1:
        parts = [merge(*parts[i:i + fan_in]) if len(parts[i:i + fan_in]) > 1 else parts[i]
                 for i in range(0, len(parts), fan_in)]
    return parts[0]


STORES: dict[StoreRef, ShardStore] = {}
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


def open_store(ref: StoreRef) -> ShardStore:
    """A cached store per process (keeps verified checksums); tasks pass entries, not names."""
    if ref not in STORES:
        STORES[ref] = ShardStore(ref.location, endpoint_url=ref.endpoint_url, region=ref.region,
                                  cache_dir=ref.cache_dir)
    return STORES[ref]


def rows_store(ref: StoreRef) -> Any:
    """:func:`open_store`, its special-token rows left out when ``ref.skip_tokens`` names any
    (see :mod:`mechray.analysis.special`)."""
    return filtered(open_store(ref), ref.skip_tokens)


def reads_store(spec: Spec) -> bool:
    """Whether the spec's finalize/fit/run reads shards (an analysis may say it does not with a
    ``reads_store(params) -> bool`` classmethod; stat analyses such as ``neuron`` need only
    their merged partial, so their S3 shards are not downloaded into the cache)."""
    says = getattr(spec.cls, "reads_store", None)
    return True if says is None else bool(says(spec.params))


def prefetch(store: ShardStore, layer: str) -> None:
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
