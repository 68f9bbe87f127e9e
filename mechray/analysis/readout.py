"""The unembedding read out lazily: compare a language model's outputs without its vocabulary.

Usage::

    from mechray.analysis.readout import Readout

    readout = Readout.find(model, "transformer.h.1", x)   # None unless the model qualifies
    with readout.swapped():
        h = output_of(x(model))          # [B, T, d_model]: the unembedding's input, not logits
    readout.logits(h[:, -1])             # [B, vocab] only where a metric reads them

A causal LM's output is ``logits = lm_head(h)``, ``[batch, T, vocab]`` (vocab ~ 30k-250k): a
neuron sweep that keeps it for ``neuron_batch`` stacked copies of a batch holds
``batch x neuron_batch x T x vocab`` floats.  When the model's output is exactly its output
embedding (``model.get_output_embeddings()``, an ``nn.Linear``) applied to a hidden state --
checked on a probe batch -- :meth:`Readout.swapped` makes that module return its input, so the
model returns ``h`` and the metric maps ``h`` to logits only as it needs them
(:class:`mechray.analysis.intervene.Metric`): MSE of logits is ``dh^T (W^T W) dh`` exactly, KL
is computed over chunks of positions, position metrics read a few rows.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Readout:
    """The model's final linear map from hidden states to outputs (its unembedding)."""

    module: nn.Linear

    @property
    def vocab(self) -> int:
        return int(self.module.out_features)

    @classmethod
    def find(cls, model: nn.Module, layer: str, x: Any) -> Optional["Readout"]:
        """The model's unembedding when its output equals ``unembedding(h)`` on ``x`` (a
        :class:`~mechray.analysis.inputs.ModelInputs`), it runs once, ``layer`` is not in it,
        and the inputs carry no ``labels``; else ``None`` (outputs are then compared whole)."""
        from mechray.analysis.inputs import output_of

        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if not isinstance(head, nn.Linear) or "labels" in getattr(x, "kwargs", {}):
            return None
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name is None or layer == name or layer.startswith(name + "."):
            return None
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(m: nn.Module, args: tuple, out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen.append((args[0].detach(), out.detach()))
        readout = cls(head)
        handle = head.register_forward_hook(keep)
        try:
            with torch.no_grad():       # the hook sees one call per run (plain, swapped)
                y = output_of(x(model))
                with readout.swapped():
                    h = output_of(x(model))
        except Exception as exc:          # noqa: BLE001 - any failure: compare outputs whole
            log.info("mechray: %s: the unembedding cannot be read out lazily (%s)", layer, exc)
            return None
        finally:
            handle.remove()
        if len(seen) != 2 or y.shape != seen[0][1].shape or h.shape != seen[0][0].shape or \
                not torch.equal(y, seen[0][1]) or not torch.equal(h, seen[0][0]):
            return None
        return readout

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the unembedding returns its input (the model returns hidden states)."""
        module: Any = self.module
        old = module.__dict__.get("forward")
        module.forward = _identity
        try:
            yield
        finally:
            if old is None:
                del module.forward
            else:
                module.forward = old

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` logits of hidden states ``[..., d]`` (float32)."""
        w = self.module.weight.detach()       # gradients flow to h only
        b = None if self.module.bias is None else self.module.bias.detach()
        out = h.to(w.dtype) @ w.T
        return (out if b is None else out + b).float()

    def gram(self) -> torch.Tensor:
        """``W^T W`` (``[d, d]``, float64): ``|logits(a) - logits(b)|^2 = (a-b)^T G (a-b)``."""
        w = self.module.weight.detach().double()
        return w.T @ w


def _identity(h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return h
