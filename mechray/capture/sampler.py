"""The capture core: forward hooks that snapshot layer outputs into a bounded row cache.

Usage::

    from mechray import ActivationSampler

    sampler = ActivationSampler(layers=["layer1"], save_dir="./custom_cache")
    sampler.register_hooks(model)
    for batch in loader:
        model(batch)
    sampler.save_activations(global_step=100)    # hands the cache to a writer, empties it
    sampler.close()                              # removes hooks, waits until shards are durable

    with ActivationSampler(config=config).attach(model) as sampler:   # hooks come off on exit
        ...

What a hook does, on the training thread and nothing more: pick the tensor (for tuple or dict
outputs the first tensor, or ``config.output_keys[layer]``), ``detach`` it, flatten leading
dimensions to ``[rows, d]`` (last dimension is the feature dimension), optionally keep
``rows_per_step`` rows chosen by a seeded generator, downcast to ``storage_dtype`` and snapshot
it.  CPU tensors are copied; CUDA tensors are copied into pinned host memory on a side stream and
an event is recorded, so the training thread never waits for the device.  Joining, serialising,
hashing and uploading happen later on a writer.

Memory is bounded: per layer the cache keeps the **newest** ``max_activations_per_shard`` rows.
When more arrive, whole older chunks are dropped (counted as ``dropped_rows`` in the shard's
metadata) and the surplus of a partly dropped chunk is trimmed when the shard is written, so at
most one forward call's rows beyond the limit are ever held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from mechray.capture.layers import pick_tensor, resolve_layers
from mechray.config import MechIntConfig
from mechray.storage.shard import Chunk, PendingShard, shard_name
from mechray.storage.transport import Transport, make_transport

log = logging.getLogger(__name__)
INPUTS = "__inputs__"


class ActivationSampler:
    """Captures the outputs of selected modules and writes them as shards.

    Accepts ``layers``/``save_dir`` as in the seed, any :class:`MechIntConfig` field as a keyword
    (``max_activations_per_shard=...``, ``storage_backend=...``), or a whole ``config=``.
    """

    def __init__(self, layers: Optional[list[str]] = None, save_dir: Optional[str] = None, *,
                 config: MechIntConfig | dict | None = None, rank: int = 0, world_size: int = 1,
                 **fields: Any):
        if layers is not None:
            fields["sample_layers"] = list(layers)
        if save_dir is not None:
            fields["storage_path"] = str(save_dir)
        self.config = MechIntConfig.coerce(config, **fields)
        self.rank, self.world_size = rank, world_size
        self.enabled = True
        self.current_step = -1
        self.next_index: Optional[int] = None
        self.layer_names: list[str] = []
        self._dtype = getattr(torch, self.config.storage_dtype)
        self._cap = self.config.max_activations_per_shard
        self._handles: list = []
        self._cache: dict[str, deque[Chunk]] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._cached_rows: dict[str, int] = {}
        self._rng = np.random.default_rng(self.config.sample_seed)  # O(k) sampling, no O(n) perm
        self._streams: dict[torch.device, Any] = {}
        self._transport: Optional[Transport] = None
        self._lock = threading.Lock()
        self.rows_captured = 0
        self.bytes_captured = 0
        self.capture_seconds = 0.0  # spent in hooks on the training thread

    # --- hooks ---------------------------------------------------------------------------------
    def register_hooks(self, model: nn.Module, inputs: Optional[bool] = None) -> "ActivationSampler":
        """Hook every module ``sample_layers`` names (exact names or globs); fails fast on typos.

        ``inputs`` (default ``config.save_inputs``) also captures the model's first input tensor.
        """
        modules = resolve_layers(model, self.config.sample_layers)
        try:
            for name, module in modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
            if self.config.save_inputs if inputs is None else inputs:
                self._handles.append(model.register_forward_pre_hook(self._input_hook))
        except BaseException:
            self.remove_hooks()
            raise
        first, self.layer_names = not self.layer_names, list(modules)
        if self.config.verbose and first:
            log.info("mechray: hooked %d layer(s): %s", len(modules), ", ".join(modules))
        return self

    def remove_hooks(self) -> None:
        """Remove every handle this sampler registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator["ActivationSampler"]:
        """``with sampler.attach(model): ...`` registers hooks and always removes them, then
        waits until every shard is durable."""
        self.register_hooks(model)
        try:
            yield self
        finally:
            self.close()

    def __enter__(self) -> "ActivationSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hook(self, name: str):
        key = self.config.output_keys.get(name)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.enabled:
                tensor = pick_tensor(output, key)
                if tensor is None:
                    log.warning("mechray: %s returned %s with no tensor to capture; set "
                                "output_keys[%r]", name, type(output).__name__, name)
                    return
                self._add(name, tensor)
        return hook

    def _input_hook(self, module: nn.Module, args: Any) -> None:
        if self.enabled:
            tensor = pick_tensor(args, None)
            if tensor is not None:
                self._add(INPUTS, tensor, flatten=False)

    # --- the cache -----------------------------------------------------------------------------
    def _add(self, layer: str, tensor: torch.Tensor, flatten: bool = True) -> None:
        t0 = time.perf_counter()
        src = tensor.detach()
        shape = list(src.shape)
        rows = src.reshape(-1, shape[-1] if shape else 1) if flatten else src.reshape(
            (-1,) + tuple(shape[1:]) if shape else (1,))
        n = rows.shape[0]
        positions, start = None, 0
        k = self.config.rows_per_step
        if flatten and k is not None and n > k:
            idx = torch.from_numpy(np.sort(self._rng.choice(n, size=k, replace=False)))
            if rows.is_cuda:  # a pinned index copies host->device without a sync
                rows = rows.index_select(0, idx.pin_memory().to(rows.device, non_blocking=True))
            else:
                rows = rows.index_select(0, idx)
            positions = idx
        elif n > self._cap:
            start = n - self._cap
            rows = rows[start:]
        if flatten and rows.dtype != self._dtype and rows.is_floating_point():
            rows = rows.to(self._dtype)
        if rows.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            rows = rows.clone()  # snapshot: later in-place ops must not change captured rows
        chunk = Chunk(rows=rows, step=self.current_step, positions=positions, start=start)
        if rows.is_cuda:
            self._to_host(chunk)
        with self._lock:
            cache = self._cache.setdefault(layer, deque())
            cache.append(chunk)
            total = self._cached_rows.get(layer, 0) + len(rows)
            info = self._info.setdefault(layer, {"source_shape": shape, "dropped_rows": 0})
            info["source_shape"] = shape
            while len(cache) > 1 and total - len(cache[0].rows) >= self._cap:
                dropped = cache.popleft()
                total -= len(dropped.rows)
                info["dropped_rows"] += len(dropped.rows)
            self._cached_rows[layer] = total
        if layer != INPUTS:
            self.rows_captured += len(rows)
            self.bytes_captured += rows.numel() * rows.element_size()
        self.capture_seconds += time.perf_counter() - t0

    def _to_host(self, chunk: Chunk) -> None:
        """Start an async device->host copy into pinned memory on a side stream."""
        src = chunk.rows
        stream = self._streams.get(src.device)
        if stream is None:
            stream = self._streams[src.device] = torch.cuda.Stream(device=src.device)
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(stream):
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        src.record_stream(stream)  # keep the device buffer alive until the copy has run
        chunk.rows, chunk.event = host, event

    @property
    def cached_rows(self) -> dict[str, int]:
        """Rows currently held per layer (at most ``max_activations_per_shard`` once written)."""
        with self._lock:
            return {k: min(v, self._cap) for k, v in self._cached_rows.items() if k != INPUTS}

    def clear_cache(self) -> None:
        """Drop every cached row without writing it."""
        with self._lock:
            self._cache.clear()
            self._cached_rows.clear()
            self._info.clear()

    # --- hand-off ------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        """The writer (Ray pool or threads), created on first use."""
        if self._transport is None:
            transport = make_transport(self.config, self.rank, self.world_size)
            first = transport.start()
            self.next_index = first if self.next_index is None else max(self.next_index, first)
            self._transport = transport
        return self._transport

    def save_activations(self, global_step: int) -> Optional[str]:
        """Hand everything cached to a writer as one shard for ``global_step``; empties the cache.

        Returns the shard's file name, or ``None`` when nothing was captured.  Returns as soon as
        the shard is queued (blocks only while ``max_shards_in_flight`` shards are pending).
        """
        if global_step is None or int(global_step) < 0:
            raise ValueError(f"global_step={global_step!r} must be an integer >= 0")
        if self._transport is not None:
            self._transport.check()  # a failed write stops us before more rows are handed off
        with self._lock:
            chunks = {k: list(v) for k, v in self._cache.items() if v}
            info = {k: dict(v) for k, v in self._info.items()}
            self._cache.clear()
            self._cached_rows.clear()
            self._info.clear()
        inputs = chunks.pop(INPUTS, [])
        if not chunks:
            if self.config.verbose:
                log.warning("mechray: nothing captured before save_activations(%d); check that "
                            "the hooked layers %s ran a forward pass", global_step,
                            self.layer_names or self.config.sample_layers)
            return None
        transport = self.transport
        index = self.next_index
        assert index is not None  # set by the transport property above
        self.next_index = index + 1
        name = shard_name(index, int(global_step), self.rank, self.world_size)
        transport.submit(PendingShard(name=name, index=index, step=int(global_step),
                                      rank=self.rank, world_size=self.world_size,
                                      max_rows=self._cap, chunks=chunks, layer_info=info,
                                      inputs=inputs))
        return name

    @property
    def stats(self):
        """The writer's :class:`~mechray.storage.transport.TransportStats`, or ``None`` before any save."""
        return self._transport.stats if self._transport is not None else None

    def flush(self) -> None:
        """Wait until every handed-off shard is durable and in the manifest."""
        if self._transport is not None:
            self._transport.flush()

    def close(self) -> None:
        """Remove hooks, then flush and stop the writer.  Cached, unsaved rows are discarded."""
        self.remove_hooks()
        if self._transport is not None:
            self._transport.close()
