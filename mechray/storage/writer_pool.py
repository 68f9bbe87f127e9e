"""The Ray writer pool: named, restartable actors that store shards and own the manifest.

Usage::

    import ray
    from mechray.storage.writer_pool import WriterPool

    ray.init()
    pool = WriterPool.get_or_create(target, config)   # the driver creates; workers find it
    done = pool.write(index, ray.put(wire))            # ObjectRef resolving to the entry

Every actor is named ``mechray-*-{target.key}`` in ``config.ray_namespace`` and created with
``get_if_exists=True``, so the driver and every Ray Train worker share one pool and one manifest
owner per store.  Actors restart after a crash (``max_restarts=-1``) and their pending calls are
retried (``max_task_retries=-1``); retrying is safe because a shard's file name is fixed by its
rank, index and step and the manifest is keyed by file name.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Optional

import ray

from mechray.storage import s3
from mechray.storage.claim import StoreBusyError, StoreClaim, _pid_alive
from mechray.storage.history import Found, late_claim, prefix_history
from mechray.storage.manifest import Manifest
from mechray.storage.shard import from_wire
from mechray.storage.sink import ShardSink
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class ShardWriter:
    """Decodes a shard from the object store, writes it durably, uploads it; returns its entry."""

    def __init__(self, target: StorageTarget):
        self.sink = ShardSink(target)
        self.held_sink = ShardSink(dataclasses.replace(target, hold_uploads=True))

    def write(self, wire: dict[str, Any], held: bool = False) -> dict[str, Any]:
        """``held``: the run has not claimed its S3 prefix; the shard stays pending_upload."""
        return (self.held_sink if held else self.sink).write(from_wire(wire))

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=16)  # type: ignore[call-overload]
class ManifestOwner:
    """The one owner of ``manifest.json`` for a store; reloads it from disk after a restart.

    Threaded (``max_concurrency``): concurrent ``add`` calls share one rewrite (group commit).
    It also holds the store's claim for the run whose ranks write through it (``join`` /
    ``leave``): the claim's token is this actor's id, so a restarted owner keeps its run's claim.
    """

    def __init__(self, target: StorageTarget, config: dict[str, Any]):
        self.target = target
        self.token = f"ray-actor:{ray.get_runtime_context().get_actor_id()}"
        self.members: dict[str, tuple[str, int]] = {}   # member -> (host, pid)
        self.claim: Optional[StoreClaim] = None
        self.config = config
        self.found: Optional[Found] = Found()
        self.manifest = Manifest(target, config)
        held = StoreClaim(target, "", token=self.token).holder()
        if held is not None and held.token == self.token:  # restarted: keep our run's claim
            self._claim(held.run_id, append=True)

    def _claim(self, run_id: str, append: bool) -> None:
        claim = StoreClaim(self.target, run_id, token=self.token).acquire()
        try:
            self.found = prefix_history(claim, self.manifest, run_id, append)
        except BaseException:
            claim.release()
            raise
        self.manifest.target = dataclasses.replace(self.target,
                                                   hold_uploads=self.found is None)
        self.claim = claim

    def held(self) -> bool:
        """Whether uploads wait: S3 was unreachable when the run claimed the store."""
        return self.found is None

    def join(self, run_id: str, member: str, append: bool = False) -> Optional[str]:
        """Let a rank of ``run_id`` write; the reason it may not (another run writes) or None."""
        host = socket.gethostname()
        for name, (h, pid) in list(self.members.items()):  # forget ranks that died here
            if h == host and not _pid_alive(pid):
                self.members.pop(name)
        if self.claim is not None and self.claim.run_id != run_id:
            if self.members:
                ranks = ", ".join(sorted(m.split("/", 1)[1] for m in self.members))
                return (f"the store {self.target.local_dir} is being written by run "
                        f"{self.claim.run_id!r} through this Ray cluster's writer pool ({ranks}); "
                        f"a second run would overwrite or drop its shards. Choose another "
                        f"storage_path (or s3_prefix) for this run, or pass "
                        f"MechIntConfig(run_id={self.claim.run_id!r}) to resume that run")
            self.claim.release()
            self.claim = None
        if self.claim is None:
            try:
                self._claim(run_id, append)
            except StoreBusyError as exc:
                return str(exc)
        _, _, rest = member.partition("/")
        parts = rest.split("/")
        self.members[member] = (parts[1], int(parts[2])) if len(parts) >= 3 else ("?", 0)
        return None

    def leave(self, member: str) -> None:
        """A rank closed its sampler; the last one out releases the claim."""
        self.members.pop(member, None)
        if not self.members:
            self.manifest.close()   # the journal folded into manifest.json: a full index again
        if not self.members and self.claim is not None:
            self.claim.release()
            self.claim = None

    def add(self, entry: dict[str, Any]) -> int:
        if self.claim is not None:
            self.claim.check()  # fenced: ClaimLostError once another run took the store
        return self.manifest.add(entry)

    def entries(self) -> list[dict[str, Any]]:
        return self.manifest.entries()

    def next_index(self, rank: int) -> int:
        return max(self.manifest.next_index(rank),
                   self.found.next_index(rank) if self.found else 0)

    def sync_pending(self, budget_s: float) -> tuple[int, int]:
        s3.breaker(self.target.endpoint_url).probe_now()  # a deliberate retry
        if self.found is None and self.claim is not None:
            if not late_claim(self.claim, self.manifest, self.claim.run_id):
                return 0, len(self.manifest.pending())
            self.found = Found()
            self.manifest.target = self.target
        return self.manifest.sync_pending(budget_s)


class WriterPool:
    """Handles to a store's writer actors and its manifest owner."""

    def __init__(self, writers: list, manifest):
        self.writers, self.manifest = writers, manifest

    @classmethod
    def get_or_create(cls, target: StorageTarget, config) -> "WriterPool":
        common = dict(namespace=config.ray_namespace, get_if_exists=True)
        # (ManifestOwner and ShardWriter are Ray actor classes: .options exists at run time)
        manifest = ManifestOwner.options(  # type: ignore[attr-defined]
            name=f"mechray-manifest-{target.key}", num_cpus=0,
            **common).remote(target, config.to_dict())
        # ``memory=1`` (one byte, a token): Ray places an actor whose resource request is empty
        # on a random node whatever its soft node affinity says (ray-project/ray#25360 fixed
        # only hard affinity); seen here as 1 run in 3 with every writer on one node under load
        writers = [ShardWriter.options(  # type: ignore[attr-defined]
                                       name=f"mechray-writer-{target.key}-{i}",
                                       num_cpus=config.writer_num_cpus, memory=1,
                                       scheduling_strategy=_spread(i), **common).remote(target)
                   for i in range(config.num_writers)]
        return cls(writers, manifest)

    def write(self, slot: int, wire_ref, held: bool = False) -> tuple:
        """Store one shard on writer ``slot % n`` and record it; returns ``(done, entry)`` refs,
        ``done`` resolving once the manifest lists the shard.  Callers pass
        ``index * world_size + rank`` so the ranks' shards of one step go to different writers;
        ``held``: the run has not claimed its S3 prefix, so the shard is not uploaded."""
        entry = self.writers[slot % len(self.writers)].write.remote(wire_ref, held)
        return self.manifest.add.remote(entry), entry

    def next_index(self, rank: int) -> int:
        return ray.get(self.manifest.next_index.remote(rank))


def _spread(i: int):
    """Writer ``i`` goes to the ``i``-th alive node (round robin), softly: if that node is gone
    when the actor (re)starts, Ray places it elsewhere.  Plain ``SPREAD`` is best effort and
    can put every zero-CPU writer on one node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    if len(nodes) < 2:
        return "SPREAD"
    return NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=True)


def start_writer_pool(config) -> WriterPool:
    """Create the store's writer actors and manifest owner from the driver (call after ray.init).

    Usage::

        ray.init(address="auto")
        start_writer_pool(MechIntConfig(sample_layers=[...], storage_path="/shared/cache"))
        TorchTrainer(train_fn, ...).fit()    # every worker's MechIntCallback finds this pool

    Actors belong to the process that creates them; creating them here, rather than in the first
    training worker to save a shard, keeps them alive for the whole job.  Use an absolute
    ``storage_path`` (or S3): Ray Train workers run in their own working directories.
    """
    from mechray.config import MechIntConfig

    config = MechIntConfig.coerce(config)
    return WriterPool.get_or_create(StorageTarget.from_config(config), config)
