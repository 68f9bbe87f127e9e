"""Model inputs for the analyses that run the model (``causal``, ``circuit``, SAE splicing).

Usage::

    from mechray.analysis.inputs import as_inputs, ModelInputs

    x = as_inputs(tokenizer(texts, padding=True, return_tensors="pt"), max_samples=256)
    x = as_inputs(torch.randn(512, 16), 256)          # a tensor: model(x)
    x = as_inputs(loader, 256)                         # batches: tensors, dicts, (inputs, labels)
    for batch in x.batches(64):                        # by length; padding trimmed per batch
        out = batch(model)                             # model(**kwargs) or model(tensor)
        batch.mask                                     # [B, T] bool of real tokens, or None

This is the one place where evaluation inputs are built (``EvalMechIntRunner``, the CLI and
every model analysis use it).  ``eval_data`` may be a tensor, a dict of tensors (a tokenizer's
``BatchEncoding``), a list of either (batches), or an iterable such as a DataLoader yielding any
of them (a tuple or list batch contributes its first element, ``(inputs, labels)``).  A dict is
passed to the model as keyword arguments with every key kept.  Dict batches of different
sequence lengths are right-padded with 0 to the longest when they carry a mask
(``attention_mask``: padding is then masked); without a mask they must have one length.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F

from mechray.capture.layers import pick_tensor

MASK_KEY = "attention_mask"


@dataclass
class ModelInputs:
    """A batch of model inputs: one positional tensor (``tensor``) or keyword tensors
    (``kwargs``, called as ``model(**kwargs)``); ``mask_key`` names the mask among them."""

    tensor: Optional[torch.Tensor] = None
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_key: str = MASK_KEY
    positions: Optional[torch.Tensor] = None   # [B, T] edited/compared, when not the own mask
    corrupt: Optional["ModelInputs"] = None    # prompt pairs: example i's corrupted twin
    ids: Optional[torch.Tensor] = None         # [B, T] tokens a loss reads, when not input_ids

    def __post_init__(self) -> None:
        if (self.tensor is None) == (not self.kwargs):
            raise ValueError("ModelInputs holds either one positional tensor or keyword tensors")
        sizes = {k: len(v) for k, v in self.kwargs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"keyword inputs disagree on the batch size: {sizes}; give tensors "
                             "with one row per example")

    def __len__(self) -> int:
        return len(self.tensor) if self.tensor is not None else len(next(iter(self.kwargs.values())))

    @property
    def mask(self) -> Optional[torch.Tensor]:
        """``[B, T]`` bool of real positions, or ``None`` (no mask: every position is real)."""
        if self.positions is not None:
            return self.positions
        m = self.kwargs.get(self.mask_key)
        return m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    @property
    def targets(self) -> Optional[torch.Tensor]:
        """``[B, T]`` token ids the model's next-token loss is measured on (``metric='lm_loss'``):
        ``ids`` when set (a corrupted run scored on its clean twin's tokens), else the
        ``input_ids`` among the keyword inputs, else ``None``."""
        if self.ids is not None:
            return self.ids
        v = self.kwargs.get("input_ids")
        return v if isinstance(v, torch.Tensor) and v.dim() == 2 else None

    @property
    def shapes(self) -> dict[str, list[int]]:
        if self.tensor is not None:
            return {"input": list(self.tensor.shape)}
        return {k: list(v.shape) for k, v in self.kwargs.items()}

    def _map(self, fn) -> "ModelInputs":
        if self.tensor is not None:
            return ModelInputs(fn(self.tensor), mask_key=self.mask_key)
        return ModelInputs(None, {k: fn(v) for k, v in self.kwargs.items()}, self.mask_key)

    def select(self, index: torch.Tensor | slice) -> "ModelInputs":
        return self._map(lambda t: t[index])

    def repeat(self, k: int) -> "ModelInputs":
        """``k`` stacked copies (copy ``j`` is rows ``j*B:(j+1)*B``)."""
        if k == 1:
            return self
        out = self._map(lambda t: t.repeat(k, *([1] * (t.dim() - 1))))
        out.positions = None if self.positions is None else self.positions.repeat(k, 1)
        return out

    def to(self, device: torch.device | str) -> "ModelInputs":
        return self._map(lambda t: t.to(device))

    def __call__(self, model: torch.nn.Module) -> Any:
        """Run ``model`` on these inputs (on the model's device)."""
        x = self.to(model_device(model))
        return model(x.tensor) if x.tensor is not None else model(**x.kwargs)

    def width(self) -> int:
        """The longest real sequence (0 without a mask)."""
        m = self.mask
        if m is None or not m.any():
            return 0
        return int(m.any(0).nonzero().max()) + 1

    def trim(self, width: int) -> "ModelInputs":
        """Drop trailing sequence positions ``>= width`` (all padding) from every ``[B, T, ...]``
        tensor; the model's outputs at real positions are unchanged."""
        m = self.mask
        if m is None or width >= m.shape[1]:
            return self
        t = m.shape[1]
        return self._map(lambda v: v[:, :width] if v.dim() >= 2 and v.shape[1] == t else v)

    def batches(self, batch_size: int, pair: Optional["ModelInputs"] = None
                ) -> list["ModelInputs"]:
        """Batches of ``batch_size``, similar lengths together (sorted by real length) with
        padding trimmed per batch; ``pair`` (the same size) is split the same way and its batches
        follow, so ``out[:n]`` and ``out[n:]`` line up.  Without a mask: consecutive rows."""
        n = len(self)
        m = self.mask
        order = torch.arange(n) if m is None else \
            torch.sort(m.sum(1), stable=True).indices
        out, paired = [], []
        for idx in torch.split(order, batch_size):
            a = self.select(idx)
            b = pair.select(idx) if pair is not None else None
            w = max(a.width(), b.width() if b is not None else 0)
            out.append(a.trim(w))
            if b is not None:
                paired.append(b.trim(w))
        return out + paired


@dataclass
class PromptPairs:
    """Clean and corrupted model inputs, example ``i`` of one paired with example ``i`` of the
    other (e.g. IOI prompts with the indirect object swapped): ``eval_data=PromptPairs(clean,
    corrupt)``, each anything :func:`as_inputs` takes, of the same shape (tokenise both in one
    call, or use :meth:`from_texts`).  ``circuit`` patches clean into corrupted runs of them;
    ``causal`` with ``method='corrupt'`` sets each neuron to its value in the corrupted run."""

    clean: Any
    corrupt: Any

    @classmethod
    def from_texts(cls, tokenizer: Any, clean: list[str], corrupt: list[str],
                   max_length: int = 512) -> "PromptPairs":
        """Both lists tokenised in one call, so they share one padded length (and side)."""
        if len(clean) != len(corrupt) or not clean:
            raise ValueError(f"prompt pairs need as many corrupted texts as clean ones (got "
                             f"{len(clean)} clean, {len(corrupt)} corrupted), at least one each")
        enc = tokenizer(list(clean) + list(corrupt), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        n = len(clean)
        return cls({k: v[:n] for k, v in enc.items()}, {k: v[n:] for k, v in enc.items()})


def as_inputs(data: Any, max_samples: int, mask_key: str = MASK_KEY) -> ModelInputs:
    """``eval_data`` (see the module docstring) as :class:`ModelInputs` of at most
    ``max_samples`` examples; errors name what was given and what to pass instead."""
    if isinstance(data, PromptPairs):
        clean = as_inputs(data.clean, max_samples, mask_key)
        corrupt = as_inputs(data.corrupt, len(clean), mask_key)
        if corrupt.shapes != clean.shapes:
            raise ValueError(f"prompt pairs: the corrupted inputs have shapes {corrupt.shapes} "
                             f"but the clean ones {clean.shapes}; give one corrupted input per "
                             f"clean one, tokenised in the same call (PromptPairs.from_texts)")
        clean.corrupt = corrupt
        return clean
    if isinstance(data, ModelInputs):
        out = data.select(slice(0, max_samples))
        out.corrupt = data.corrupt.select(slice(0, max_samples)) if data.corrupt else None
        return out
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise ValueError("eval_data is a 0-d tensor; pass a batch of model inputs [N, ...]")
        return ModelInputs(data[:max_samples], mask_key=mask_key)
    if isinstance(data, Mapping):
        return _one(data, "eval_data", mask_key).select(slice(0, max_samples))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"eval_data is a {type(data).__name__}; pass a tensor, a dict of "
                        "tensors (a tokenizer's output with return_tensors='pt'), a list of "
                        "either, or a DataLoader yielding them")
    parts: list[ModelInputs] = []
    total = 0
    for i, batch in enumerate(data):
        if isinstance(batch, (tuple, list)):
            batch = batch[0] if batch else None             # (inputs, labels) from a loader
        part = ModelInputs(batch, mask_key=mask_key) if isinstance(batch, torch.Tensor) else \
            _one(batch, f"eval_data batch {i}", mask_key)
        parts.append(part.select(slice(0, max_samples - total)))
        total += len(parts[-1])
        if total >= max_samples:
            break
    if not parts:
        raise ValueError("eval_data is empty; pass a tensor, a dict of tensors or a non-empty "
                         "DataLoader")
    return concat(parts)


def _one(batch: Any, where: str, mask_key: str) -> ModelInputs:
    if isinstance(batch, torch.Tensor):
        return ModelInputs(batch, mask_key=mask_key)
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__} holding no tensor; batches must "
                        "be tensors, dicts of tensors, or (inputs, labels) tuples")
    kwargs, bad = {}, []
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            kwargs[str(key)] = value
        else:
            bad.append(f"{key!r} ({type(value).__name__})")
    if bad:
        raise TypeError(f"{where} has non-tensor values {', '.join(bad)}; every key is passed "
                        "to the model, so give tensors (tokenize with return_tensors='pt')")
    if not kwargs:
        raise ValueError(f"{where} is an empty dict; pass the model's keyword inputs")
    return ModelInputs(None, kwargs, mask_key)


def concat(parts: list[ModelInputs]) -> ModelInputs:
    """One :class:`ModelInputs` from several batches (sequences padded as the docstring says)."""
    if len(parts) == 1:
        return parts[0]
    tensors = [p.tensor for p in parts if p.tensor is not None]
    if len(tensors) == len(parts):
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"eval_data batches have different shapes {sorted(shapes)}; pad them "
                             "to one shape, or give dicts with an attention_mask")
        return ModelInputs(torch.cat(tensors), mask_key=parts[0].mask_key)
    keys = {tuple(sorted(p.kwargs)) for p in parts if p.tensor is None}
    if any(p.tensor is not None for p in parts) or len(keys) > 1:
        raise ValueError(f"eval_data mixes batches of different kinds (keys {sorted(keys)}); "
                         "give every batch the same keys")
    key = parts[0].mask_key
    lengths = {p.kwargs[k].shape[1] for p in parts for k in p.kwargs if p.kwargs[k].dim() >= 2}
    if len(lengths) > 1 and any(p.mask is None for p in parts):
        raise ValueError(f"eval_data batches have sequence lengths {sorted(lengths)} but no "
                         f"{key!r} to mark padding; include the mask (tokenizer output) or pad "
                         "them to one length")
    out = {}
    for k in parts[0].kwargs:
        values = [p.kwargs[k] for p in parts]
        width = max(v.shape[1] if v.dim() >= 2 else 0 for v in values)
        out[k] = torch.cat([F.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1]))
                            if v.dim() >= 2 else v for v in values])
    return ModelInputs(None, out, key)


def from_payload(value: Any) -> Optional[ModelInputs]:
    """The ``inputs`` a shard holds (a tensor, or a dict of keyword tensors), or ``None``."""
    if isinstance(value, torch.Tensor):
        return ModelInputs(value.clone())
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor)
                                                 for v in value.values()):
        return ModelInputs(None, {str(k): v.clone() for k, v in value.items()})
    return None


def stored_inputs(store: Any, max_samples: int) -> Optional[ModelInputs]:
    """Model inputs saved with the shards (``save_inputs=True``), newest step first; batches
    that cannot join the first kind are skipped; ``None`` when none were saved."""
    entries = [e for e in store.shards() if e.get("has_inputs")]
    parts: list[ModelInputs] = []
    total = 0
    for entry in sorted(entries, key=lambda e: (-e["step"], e["file"])):
        x = from_payload(store.load(entry).get("inputs"))
        if x is None or (parts and not _joins(parts[0], x)):
            continue
        parts.append(x.select(slice(0, max_samples - total)))
        total += len(parts[-1])
        if total >= max_samples:
            break
    return concat(parts) if parts else None


def _joins(a: ModelInputs, b: ModelInputs) -> bool:
    if a.tensor is not None or b.tensor is not None:
        return a.tensor is not None and b.tensor is not None and \
            a.tensor.shape[1:] == b.tensor.shape[1:]
    return sorted(a.kwargs) == sorted(b.kwargs) and (a.mask is not None or a.shapes == b.shapes)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives (its first parameter or buffer; CPU for a model with neither)."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def output_of(out: Any) -> torch.Tensor:
    """The model output to compare: itself, or its first tensor."""
    t = pick_tensor(out, None)
    if t is None:
        raise TypeError(f"the model returned {type(out).__name__} with no tensor to compare")
    return t
