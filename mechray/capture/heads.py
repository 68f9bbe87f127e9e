"""Attention heads as capture points: ``name:heads`` is an attention module's per-head outputs.

Usage::

    from mechray.capture.heads import HEADS, head_point, split_heads

    config = MechIntConfig(sample_layers=["transformer.h.1.attn:heads"], ...)   # capture
    get_analysis("circuit", {...}).run(ctx, "transformer.h.1.attn:heads")   # rank heads
    point = head_point(model.transformer.h[1].attn, "transformer.h.1.attn:heads")
    point.n_head, point.d_head                       # 4, 16
    split_heads(rows, point.n_head)                  # [..., n_head * d_head] -> [..., n_head, d_head]

The per-head outputs are what each head writes before the output projection mixes them
(TransformerLens' ``hook_z``): the input of the attention module's output projection (GPT-2's
``c_proj``, BERT's ``output.dense``, Llama's ``o_proj``, ``out_proj``, GPT-NeoX's ``dense``),
or, for a module without one whose output is the concatenated heads (BERT's
``attention.self``), its first output tensor.  The tensor is ``[batch, seq, n_head * d_head]``
with head ``h`` in features ``h * d_head .. (h + 1) * d_head`` (HF's layout), so stored rows have
``n_head * d_head`` features; :func:`split_heads` gives ``[..., n_head, d_head]``.  ``causal``
and ``circuit`` on a ``:heads`` layer ablate or patch one head at a time (all of its features)
and rank heads (``{"head": h, "effect": ...}``).  Head outputs are exact: the projection of the
concatenated heads is the sum of each head's ``z_h @ W_O[h]``, so zeroing head ``h``'s block
removes its contribution (and only it) from the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mechray.capture.layers import HEADS
from mechray.errors import UnknownLayerError

__all__ = ["HEADS", "HeadPoint", "head_point", "split_heads"]
_PROJECTIONS = ("c_proj", "o_proj", "out_proj", "output.dense", "dense")
_N_HEAD = ("num_heads", "n_head", "num_attention_heads", "n_heads")


@dataclass
class HeadPoint:
    """Where an attention module's per-head outputs are read (and edited)."""

    module: nn.Module     # the output projection (its input is read) or the attention module
    reads_input: bool     # True: ``module``'s input; False: its first output tensor
    n_head: int
    d_head: int


def head_point(attn: nn.Module, name: str = "") -> HeadPoint:
    """The :class:`HeadPoint` of attention module ``attn`` (``name`` for errors); raises
    :class:`~mechray.errors.UnknownLayerError` naming what it looked for."""
    n_head = _n_head(attn)
    if n_head is None:
        raise UnknownLayerError(
            f"layer {name!r}: {type(attn).__name__} has no head count (looked for attributes "
            f"{', '.join(_N_HEAD)}, on it, its 'self' child or its config); name an attention "
            f"module such as 'transformer.h.1.attn' (GPT-2) or "
            f"'encoder.layer.1.attention' (BERT)")
    modules = dict(attn.named_modules())
    for proj_name in _PROJECTIONS:
        proj = modules.get(proj_name)
        width = _in_features(proj)
        if proj is not None and width is not None and width % n_head == 0:
            return HeadPoint(proj, True, n_head, width // n_head)
    size = getattr(attn, "all_head_size", None) or getattr(attn, "embed_dim", None)
    if isinstance(size, int) and size % n_head == 0:      # outputs the concatenated heads
        return HeadPoint(attn, False, n_head, size // n_head)
    raise UnknownLayerError(
        f"layer {name!r}: {type(attn).__name__} has {n_head} heads but no output projection "
        f"({', '.join(_PROJECTIONS)}) whose input could be split by head; capture "
        f"'<projection>:input' instead")


def split_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """``[..., n_head * d_head]`` -> ``[..., n_head, d_head]``."""
    if t.shape[-1] % n_head:
        raise ValueError(f"{t.shape[-1]} features do not split into {n_head} heads")
    return t.unflatten(-1, (n_head, t.shape[-1] // n_head))


def _n_head(attn: nn.Module) -> Optional[int]:
    for owner in (attn, getattr(attn, "self", None), getattr(attn, "config", None)):
        for key in _N_HEAD:
            value = getattr(owner, key, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _in_features(module: Optional[nn.Module]) -> Optional[int]:
    if module is None:
        return None
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    w = getattr(module, "weight", None)       # HF Conv1D: weight [in, out], nx = in
    nx = getattr(module, "nx", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(nx, int):
        return nx
    return None
