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

Token models: only real positions are stored.  The mask of a forward call is found in its
keyword arguments (``config.mask_key``, default ``attention_mask``; token ids under
``config.token_ids_key``, default ``input_ids``), so ``model(**tokenizer(texts, padding=True,
return_tensors="pt"))`` needs nothing else; or give it around the forward::

    with sampler.tokens(mask=enc["attention_mask"], input_ids=enc["input_ids"]):
        model(enc["input_ids"], enc["attention_mask"])

A hooked output ``[B, T, ..., d]`` then keeps the rows of real tokens only, and each stored row
carries its example (index into the shard's ``examples`` table of token ids), position and token
id (see :mod:`mechray.capture.tokens`); outputs ``[B, d]`` keep one row per example.

Special tokens: given a tokenizer (``ActivationSampler(..., tokenizer=tok)``,
``MechIntHooks(config, tokenizer=tok)``) the rows of its ``all_special_ids`` ([CLS], [SEP],
BOS, EOS, PAD) are left out too, so statistics and top contexts are about the text (the
examples table keeps them: contexts still show them around a token).  ``special_token_ids``
names the ids without a tokenizer; ``exclude_special_tokens=False`` keeps every real row.

Memory is bounded: per layer the cache keeps the **newest** ``max_activations_per_shard`` rows.
When more arrive, whole older chunks are dropped (counted as ``dropped_rows`` in the shard's
metadata) and the surplus of a partly dropped chunk is trimmed when the shard is written, so at
most one forward call's rows beyond the limit are ever held.  ``save_activations`` logs a
warning naming each layer that lost rows, how many of how many, and the setting to change (once
per layer per shard, and at most once a minute per layer: the rows dropped by the shards in
between are added to the next warning).
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

from mechray.capture.heads import head_point
from mechray.capture.layers import HEADS, INPUT, module_input, pick_tensor, resolve_layers
from mechray.capture.tokens import TokenBatch, find_tokens, mask_chunk
from mechray.config import MechIntConfig
from mechray.storage.claim import run_id_for
from mechray.storage.shard import Chunk, PendingShard, shard_name
from mechray.storage.transport import Transport, make_transport

log = logging.getLogger(__name__)
DROP_WARN_SECONDS = 60.0   # at most one dropped-rows warning per layer per minute


def special_token_ids(config: MechIntConfig, tokenizer: Any = None) -> Optional[torch.Tensor]:
    """The token ids whose rows capture leaves out: ``config.special_token_ids``, else the
    tokenizer's ``all_special_ids``; ``None`` when ``exclude_special_tokens`` is off or there
    are none."""
    if not config.exclude_special_tokens:
        return None
    ids = config.special_token_ids
    if ids is None and tokenizer is not None:
        ids = list(getattr(tokenizer, "all_special_ids", None) or [])
    return torch.tensor(sorted(set(ids)), dtype=torch.long) if ids else None


class ActivationSampler:
    """Captures the outputs of selected modules and writes them as shards.

    Accepts ``layers``/``save_dir`` as in the seed, any :class:`MechIntConfig` field as a keyword
    (``max_activations_per_shard=...``, ``storage_backend=...``), or a whole ``config=``.
    """

    def __init__(self, layers: Optional[list[str]] = None, save_dir: Optional[str] = None, *,
                 config: MechIntConfig | dict | None = None, rank: int = 0, world_size: int = 1,
                 tokenizer: Any = None, **fields: Any):
        if layers is not None:
            fields["sample_layers"] = list(layers)
        if save_dir is not None:
            fields["storage_path"] = str(save_dir)
        self.config = MechIntConfig.coerce(config, **fields)
        self.rank, self.world_size = rank, world_size
        # the run this sampler writes for (one writing run per store; see mechray.storage.claim).  Ranks
        # of one run must agree on it, so with several ranks it is settled now, on every rank.
        self.run_id: Optional[str] = self.config.run_id if world_size == 1 else \
            run_id_for(self.config.run_id, rank, world_size)
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
        self._explicit: Optional[TokenBatch] = None    # set by tokens()/set_tokens()
        self._auto: Optional[TokenBatch] = None        # found in the running forward's kwargs
        self._example0: dict[int, int] = {}            # id(batch) -> its first example index
        self._examples: list[torch.Tensor] = []        # [B, T] int32 id tables, this shard
        self._example_steps: list[int] = []
        self._example_masks: list[TokenBatch] = []   # the batches that masked rows at capture
        self._n_examples = 0
        self._inputs: list[Any] = []                   # model inputs (save_inputs)
        self._input_rows = 0
        self._unmasked: set[str] = set()               # layers warned about a mask misfit
        self.special_ids = special_token_ids(self.config, tokenizer)
        self.rows_captured = 0
        self.rows_dropped: dict[str, int] = {}   # per layer, over the sampler's life
        self._drop_warned: dict[str, float] = {}      # layer -> time of its last warning
        self._drop_pending: dict[str, list[int]] = {}  # layer -> [rows, shards] not yet warned
        self.bytes_captured = 0
        self.capture_seconds = 0.0  # spent in hooks on the training thread

    # --- hooks ---------------------------------------------------------------------------------
    def register_hooks(self, model: nn.Module, inputs: Optional[bool] = None) -> "ActivationSampler":
        """Hook every module ``sample_layers`` names (exact names or globs); fails fast on typos.

        ``inputs`` (default ``config.save_inputs``) also captures the model's inputs: its first
        positional tensor, or its keyword tensors (``model(**enc)``).  With ``config.mask_key``
        set, a mask among the forward's keyword arguments selects the real positions.
        """
        modules = resolve_layers(model, self.config.sample_layers)
        try:
            for name, module in modules.items():
                point = head_point(module, name) if name.endswith(HEADS) else None
                if point is not None:             # per-head outputs: [.., n_head * d_head]
                    module = point.module
                if name.endswith(INPUT) or (point is not None and point.reads_input):
                    self._handles.append(module.register_forward_pre_hook(
                        self._input_hook(name), with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._hook(name)))
            save = self.config.save_inputs if inputs is None else inputs
            if save or self.config.mask_key:
                self._handles.append(model.register_forward_pre_hook(
                    self._pre_hook(save), with_kwargs=True))  # each call resets the mask
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
        self._auto = None

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

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.enabled:
                tensor = module_input(args, kwargs)
                if tensor is None:
                    log.warning("mechray: %s: the module got no tensor input", name)
                    return
                self._add(name, tensor)
        return hook

    def _pre_hook(self, save: bool):
        cfg = self.config

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.enabled:
                return
            if cfg.mask_key and self._explicit is None:
                found = find_tokens(args, kwargs, cfg.mask_key, cfg.token_ids_key)
                self._auto = found.without(self.special_ids) if found is not None else None
            if save:
                self._add_inputs(args, kwargs)
        return hook

    # --- token masks ---------------------------------------------------------------------------
    @contextmanager
    def tokens(self, mask: Any = None, input_ids: Any = None) -> Iterator["ActivationSampler"]:
        """``with sampler.tokens(mask=attention_mask, input_ids=ids): model(...)``: forward
        calls inside store only the positions where ``mask`` is true, with their provenance."""
        self.set_tokens(mask, input_ids)
        try:
            yield self
        finally:
            self.clear_tokens()

    def set_tokens(self, mask: Any = None, input_ids: Any = None) -> None:
        """The mask (``[batch, seq]``) and token ids of the next forward calls, until
        :meth:`clear_tokens` (the Lightning callback sets them from each batch)."""
        batch = TokenBatch.of(mask, input_ids)
        self._explicit = batch.without(self.special_ids) if batch is not None else None

    def clear_tokens(self) -> None:
        self._explicit = None

    def _example_offset(self, batch: TokenBatch) -> int:
        """The index of ``batch``'s first example in this shard's examples table (with the lock
        held; a batch is added to the table the first time one of its rows is captured)."""
        key = id(batch)
        if key not in self._example0:
            self._example0 = {key: self._n_examples}   # only the running batch is remembered
            self._examples.append(batch.ids_table())
            self._example_steps.append(self.current_step)
            self._example_masks.append(batch)
            self._n_examples += batch.size
        return self._example0[key]

    def _add_inputs(self, args: tuple, kwargs: dict) -> None:
        """Keep the forward's inputs: keyword tensors as a dict, else the first positional."""
        kw = {k: v.detach().cpu().clone() for k, v in kwargs.items()
              if isinstance(v, torch.Tensor) and v.dim() >= 1}
        if not kw and args and isinstance(args[0], dict):
            kw = {k: v.detach().cpu().clone() for k, v in args[0].items()
                  if isinstance(v, torch.Tensor) and v.dim() >= 1}
        value: Any = kw or None
        if value is None:
            tensor = pick_tensor(args, None)
            if tensor is None:
                return
            value = tensor.detach().cpu().clone()
            first = next((x for x in self._inputs if isinstance(x, torch.Tensor)), None)
            if first is not None and first.shape[1:] != value.shape[1:]:
                raise ValueError(
                    f"save_inputs: this shard already holds model inputs of shape "
                    f"{list(first.shape)} and the forward got {list(value.shape)}; positional "
                    f"inputs of different lengths cannot share a shard. Call the model with "
                    f"keyword inputs and a mask (model(**tokenizer(..., return_tensors='pt'))), "
                    f"pad to one length, or save_activations after each batch")
        with self._lock:
            self._inputs.append(value)
            self._input_rows += len(next(iter(value.values())) if isinstance(value, dict)
                                    else value)
            while len(self._inputs) > 1 and self._input_rows > self._cap:
                old = self._inputs.pop(0)
                self._input_rows -= len(next(iter(old.values())) if isinstance(old, dict) else old)

    # --- the cache -----------------------------------------------------------------------------
    def _add(self, layer: str, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        src = tensor.detach()
        shape = list(src.shape)
        batch = self._explicit or self._auto
        picked = batch.select(src, 0) if batch is not None else None
        if batch is not None and picked is None and layer not in self._unmasked:
            self._unmasked.add(layer)
            log.warning("mechray: %s outputs %s, which does not start with the mask's [batch, "
                        "seq] %s: its rows are stored unmasked", layer, shape,
                        list(batch.mask.shape))
        rows = picked.rows if picked is not None else \
            src.reshape(-1, shape[-1] if shape else 1)
        n = rows.shape[0]
        positions, start = None, 0
        keep: Optional[torch.Tensor] = None
        k = self.config.rows_per_step
        if k is not None and n > k:
            keep = torch.from_numpy(np.sort(self._rng.choice(n, size=k, replace=False)))
            if rows.is_cuda:  # a pinned index copies host->device without a sync
                rows = rows.index_select(0, keep.pin_memory().to(rows.device, non_blocking=True))
            else:
                rows = rows.index_select(0, keep)
            positions = keep
        elif n > self._cap:
            start = n - self._cap
            rows = rows[start:]
            keep = torch.arange(start, n)
        if rows.dtype != self._dtype and rows.is_floating_point():
            rows = rows.to(self._dtype)
        if rows.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            rows = rows.clone()  # snapshot: later in-place ops must not change captured rows
        chunk = Chunk(rows=rows, step=self.current_step, positions=positions, start=start)
        if rows.is_cuda:
            self._to_host(chunk)
        with self._lock:
            if picked is not None and batch is not None:
                offset = self._example_offset(batch)
                prov = [picked.example + offset, picked.position, picked.token]
                if keep is not None:
                    prov = [p[keep] for p in prov]
                chunk.example, chunk.position, chunk.token = prov
            cache = self._cache.setdefault(layer, deque())
            cache.append(chunk)
            total = self._cached_rows.get(layer, 0) + len(rows)
            info = self._info.setdefault(layer, {"source_shape": shape, "dropped_rows": 0})
            info["source_shape"] = shape
            dropped = start
            while len(cache) > 1 and total - len(cache[0].rows) >= self._cap:
                old = cache.popleft()
                total -= len(old.rows)
                dropped += len(old.rows)
            info["dropped_rows"] += dropped
            self.rows_dropped[layer] = self.rows_dropped.get(layer, 0) + dropped
            self._cached_rows[layer] = total
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
            return {k: min(v, self._cap) for k, v in self._cached_rows.items()}

    def clear_cache(self) -> None:
        """Drop every cached row without writing it."""
        with self._lock:
            self._take()

    def _take(self) -> tuple:
        """With the lock held: everything cached for one shard, and an empty cache."""
        chunks = {k: list(v) for k, v in self._cache.items() if v}
        info = {k: dict(v) for k, v in self._info.items()}
        for layer, total in self._cached_rows.items():  # the surplus the writer trims
            surplus = max(0, total - self._cap)
            if surplus:
                self.rows_dropped[layer] = self.rows_dropped.get(layer, 0) + surplus
            if layer in info:
                info[layer]["shard_dropped"] = info[layer]["dropped_rows"] + surplus
                info[layer]["shard_kept"] = min(total, self._cap)
        examples = (self._examples, self._example_steps)
        inputs = self._inputs
        self._cache.clear()
        self._cached_rows.clear()
        self._info.clear()
        self._examples, self._example_steps, self._n_examples = [], [], 0
        self._example_masks = []
        self._example0 = {}
        self._inputs, self._input_rows = [], 0
        return chunks, info, examples, inputs

    def _mask_cache(self, batch: Optional[TokenBatch]) -> None:
        """``save_activations(mask=...)``: every cached chunk reduced to real-token rows."""
        assert batch is not None
        with self._lock:
            if any(c.example is not None for cache in self._cache.values() for c in cache) and \
                    self._same_as_capture(batch):
                return            # the rows were masked at capture with this very mask
            masked = {layer: [mask_chunk(c, batch, self._info[layer]["source_shape"], layer)
                              for c in cache] for layer, cache in self._cache.items() if cache}
            offset = self._example_offset(batch) if masked else 0
            for layer, chunks in masked.items():        # all checked: now replace
                for c in chunks:
                    c.example += offset
                self._cache[layer] = deque(chunks)
                self._cached_rows[layer] = sum(len(c.rows) for c in chunks)

    def _same_as_capture(self, batch: TokenBatch) -> bool:
        """Whether every cached chunk was masked at capture by one batch equal to ``batch``
        (mask, and token ids where ``batch`` has them)."""
        if len(self._example_masks) != 1 or any(c.example is None for cache in
                                                self._cache.values() for c in cache):
            return False
        seen = self._example_masks[0]
        if seen.mask.shape != batch.mask.shape or \
                not torch.equal(seen.mask.cpu(), batch.mask.cpu()):
            return False
        return batch.input_ids is None or torch.equal(seen.ids_table(), batch.ids_table())

    # --- hand-off ------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        """The writer (Ray pool or threads), created on first use."""
        if self._transport is None:
            transport = make_transport(self.config, self.rank, self.world_size, self.run_id)
            self.run_id = transport.run_id
            first = transport.start()
            self.next_index = first if self.next_index is None else max(self.next_index, first)
            self._transport = transport
        return self._transport

    def save_activations(self, global_step: int, mask: Any = None,
                         input_ids: Any = None) -> Optional[str]:
        """Hand everything cached to a writer as one shard for ``global_step``; empties the cache.

        Returns the shard's file name, or ``None`` when nothing was captured.  Returns as soon as
        the shard is queued (blocks only while ``max_shards_in_flight`` shards are pending).
        ``mask`` (``[batch, seq]``, e.g. the batch's ``attention_mask``) and ``input_ids`` keep
        only the real-token rows of what was cached since the last save (every forward call
        then is taken to be on this batch), with their provenance (as
        :meth:`tokens` around the forward does, which also avoids waiting for a GPU copy).
        When the forward already got a mask (rows masked at capture), ``mask`` must equal it (it
        is then redundant and accepted); a different one is an error.
        """
        if global_step is None or int(global_step) < 0:
            raise ValueError(f"global_step={global_step!r} must be an integer >= 0")
        if mask is not None or input_ids is not None:
            batch = TokenBatch.of(mask, input_ids)
            self._mask_cache(batch.without(self.special_ids) if batch is not None else None)
        if self._transport is not None:
            self._transport.check()  # a failed write stops us before more rows are handed off
        elif any(self._cache.values()):
            _ = self.transport  # claim the store before the cache is emptied: a refusal loses nothing
        with self._lock:
            chunks, info, (examples, example_steps), inputs = self._take()
        for layer, meta in info.items():
            dropped = meta.pop("shard_dropped", 0)
            kept = meta.pop("shard_kept", 0)
            if dropped and layer in chunks:
                self._warn_dropped(layer, dropped, kept, int(global_step))
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
                                      inputs=inputs, examples=examples,
                                      example_steps=example_steps, run_id=self.run_id))
        return name

    def _warn_dropped(self, layer: str, dropped: int, kept: int, step: int) -> None:
        """One warning for the rows ``layer`` lost in this shard (rate-limited per layer)."""
        pending = self._drop_pending.setdefault(layer, [0, 0])
        now = time.monotonic()
        last = self._drop_warned.get(layer)
        if last is not None and now - last < DROP_WARN_SECONDS:
            pending[0] += dropped
            pending[1] += 1
            return
        self._drop_warned[layer] = now
        earlier = f" (and {pending[0]:,} rows in {pending[1]} earlier shard(s) since the last " \
                  f"warning)" if pending[1] else ""
        self._drop_pending[layer] = [0, 0]
        log.warning("mechray: %s dropped %s of %s rows captured for the shard of step %d: "
                    "max_activations_per_shard=%d keeps the newest rows per layer per shard%s; "
                    "raise max_activations_per_shard, call save_activations more often, or set "
                    "rows_per_step to sample rows evenly", layer, f"{dropped:,}",
                    f"{dropped + kept:,}", step, self._cap, earlier)

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
