"""Which rows of a layer's output are real tokens, and where each came from.

Usage::

    from mechray.capture.tokens import TokenBatch

    batch = TokenBatch.of(mask=enc["attention_mask"], input_ids=enc["input_ids"])
    picked = batch.select(hidden, example0=0)     # None when hidden is not [B, T, ...] / [B, d]
    picked.rows, picked.example, picked.position, picked.token

A layer output ``[B, T, ..., d]`` whose leading shape equals the mask's ``[B, T]`` keeps only the
positions where the mask is true (the rows of every real token, in batch-major order, exactly as
a loop over the unpadded sequences would produce them); a per-example output ``[B, d]`` keeps
its ``B`` rows with position ``-1``.  The companion tensors are small integers: ``example``
(index into the shard's table of examples), ``position`` (in the sequence) and ``token`` (id, or
``-1`` when no token ids were given).  Mask indices are computed on the mask's device: a CPU mask
never synchronises a CUDA stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch


@dataclass
class Picked:
    """Rows of one layer output that are real tokens, with their provenance."""

    rows: torch.Tensor
    example: torch.Tensor      # int32 [rows]: index into the shard's examples table
    position: torch.Tensor     # int32 [rows]: position in the sequence (-1: per-example row)
    token: torch.Tensor        # int32 [rows]: token id (-1: unknown)


@dataclass
class TokenBatch:
    """The mask (``[B, T]`` bool) and token ids (``[B, T]`` int, optional) of one forward call."""

    mask: torch.Tensor
    input_ids: Optional[torch.Tensor] = None
    skip: Optional[torch.Tensor] = None    # [B, T] bool: real positions not stored (special ids)

    @property
    def stored(self) -> torch.Tensor:
        """The positions whose rows are stored: real ones (``mask``) not in ``skip``."""
        return self.mask if self.skip is None else self.mask & ~self.skip

    def without(self, ids: Optional[torch.Tensor]) -> "TokenBatch":
        """This batch with the positions holding any of token ``ids`` left out of the stored
        rows (they stay in the examples table, so contexts keep their positions)."""
        if ids is None or not len(ids) or self.input_ids is None:
            return self
        skip = torch.isin(self.input_ids, ids.to(self.input_ids.device)).to(self.mask.device)
        return TokenBatch(self.mask, self.input_ids, skip)

    @classmethod
    def of(cls, mask: Any = None, input_ids: Any = None) -> Optional["TokenBatch"]:
        """Validate and build; ``None`` when neither is given.  Without a mask every position of
        ``input_ids`` is real."""
        if mask is None and input_ids is None:
            return None
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids)
            if input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError(f"input_ids must be integer token ids [batch, seq], got "
                                 f"{input_ids.dtype} of shape {list(input_ids.shape)}")
        if mask is None:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise ValueError(f"the mask must be [batch, seq] (an attention_mask), got shape "
                             f"{list(mask.shape)}")
        if input_ids is not None and input_ids.shape != mask.shape:
            raise ValueError(f"input_ids {list(input_ids.shape)} and mask {list(mask.shape)} "
                             "differ in shape; pass the pair from one tokenizer call")
        return cls(mask.bool(), input_ids)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def ids_table(self) -> torch.Tensor:
        """``[B, T]`` int32 token ids with ``-1`` at masked positions (or everywhere when no ids
        were given): the rows this batch adds to the shard's examples table."""
        mask = self.mask.cpu()
        if self.input_ids is None:
            return torch.full(mask.shape, -1, dtype=torch.int32)
        return torch.where(mask, self.input_ids.cpu().to(torch.int32), -1)

    def select(self, t: torch.Tensor, example0: int) -> Optional[Picked]:
        """The real-token rows of a layer output, or ``None`` when its shape does not start with
        ``[B, T]`` or ``[B]`` of this batch (the caller then stores it unmasked)."""
        b, s = self.mask.shape
        if t.dim() >= 3 and tuple(t.shape[:2]) == (b, s):
            flat = t.reshape(b * s, *t.shape[2:]).reshape(b * s, -1) if t.dim() > 3 else \
                t.reshape(b * s, t.shape[-1])
            idx = self.stored.reshape(-1).cpu().nonzero().flatten()
            rows = flat.index_select(0, idx.to(flat.device, non_blocking=True))
            example, position = idx // s, idx % s
            token = self.ids_table().reshape(-1)[idx] if self.input_ids is not None else \
                torch.full((len(idx),), -1, dtype=torch.int32)
        elif t.dim() == 2 and t.shape[0] == b:
            rows, example = t, torch.arange(b)
            position = torch.full((b,), -1, dtype=torch.int64)
            token = torch.full((b,), -1, dtype=torch.int32)
        else:
            return None
        return Picked(rows, (example + example0).to(torch.int32), position.to(torch.int32),
                      token.to(torch.int32))


def find_tokens(args: tuple, kwargs: Mapping[str, Any], mask_key: Optional[str],
                ids_key: Optional[str]) -> Optional[TokenBatch]:
    """The mask and ids of a forward call: ``kwargs[mask_key]`` / ``kwargs[ids_key]``, or the
    same keys of a dict passed as the first argument (``model(batch)``), with a positional
    integer tensor as the ids.  ``None`` when no mask is found."""
    source: Mapping[str, Any] = kwargs
    if (mask_key is None or mask_key not in kwargs) and args and isinstance(args[0], Mapping):
        source = args[0]
    mask = source.get(mask_key) if mask_key else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    ids = source.get(ids_key) if ids_key else None
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if not isinstance(ids, torch.Tensor) or ids.shape != mask.shape or ids.is_floating_point():
        ids = None
    return TokenBatch.of(mask=mask, input_ids=ids)


def mask_chunk(chunk: Any, batch: TokenBatch, shape: list[int], layer: str,
               example0: int = 0) -> Any:
    """A cached, unmasked :class:`~mechray.storage.shard.Chunk` of ``layer`` (output shape
    ``shape``) with only the rows of ``batch``'s real tokens, and their provenance: what
    ``save_activations(step, mask=...)`` does to rows captured without a mask.  ``example0`` is
    the batch's first row in the shard's examples table.  Waits for a pending device copy.
    Raises ``ValueError`` naming the layer when the rows cannot be this batch's."""
    b, s = batch.mask.shape
    hint = ("give the mask around the forward instead: with sampler.tokens(mask=..., "
            "input_ids=...): model(...), or call the model with the mask as a keyword argument")
    if chunk.example is not None:
        raise ValueError(f"save_activations(mask=...): rows of {layer!r} were already masked at "
                         "capture (a mask in the forward's keyword arguments or "
                         "sampler.tokens(...)) by a mask other than this one (or by several "
                         "batches); drop mask=, pass the forward's own mask, or set "
                         "mask_key=None")
    tokens = len(shape) == 3 and shape[:2] == [b, s]
    if not tokens and shape[:1] != [b]:
        raise ValueError(f"save_activations(mask=...): {layer!r} output {shape} does not start "
                         f"with the mask's [batch, seq] {[b, s]}; {hint}")
    if not tokens and len(shape) != 2:
        raise ValueError(f"save_activations(mask=...): {layer!r} output {shape} is neither "
                         f"[batch, seq, d] nor [batch, d] of the mask {[b, s]}; {hint}")
    rows = chunk.ready()
    pos = chunk.positions if chunk.positions is not None else \
        torch.arange(chunk.start, chunk.start + len(rows), dtype=torch.int64)
    limit = b * s if tokens else b
    if len(pos) and int(pos.max()) >= limit:
        raise ValueError(f"save_activations(mask=...): {layer!r} holds more rows since the last "
                         f"save than one batch of the mask {[b, s]} (several forward calls?); "
                         f"save after each batch, or {hint}")
    flat = batch.stored.reshape(-1).cpu()
    if tokens:
        keep = flat[pos]
        pos = pos[keep]
        rank = torch.cumsum(flat.long(), 0) - 1         # index among the real rows of the call
        example, position = pos // s, (pos % s).to(torch.int32)
        token = batch.ids_table().reshape(-1)[pos]
        rows, positions = rows[keep.to(rows.device)], rank[pos]
    else:
        example, position = pos, torch.full((len(pos),), -1, dtype=torch.int32)
        token = torch.full((len(pos),), -1, dtype=torch.int32)
        positions = pos
    return type(chunk)(rows=rows, step=chunk.step, positions=positions,
                       example=(example + example0).to(torch.int32), position=position,
                       token=token.to(torch.int32))
