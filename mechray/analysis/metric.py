"""How much a model's output changed under an intervention: :class:`Metric` accumulates a
change (``mse``, ``kl``, a user ``loss``, the LM's ``lm_loss``, ``logit_diff``, ``prob``) over
batches and stacked interventions, on logits or lazily through a :class:`Readout`.

Usage::

    from mechray.analysis.metric import make_metric

    metric = make_metric("mse")                    # or "kl", or "loss" + loss_fn
    change = metric.value(ablated_outputs, clean_outputs)

The interventions themselves (hooks, sweeps, prefixes) are in :mod:`mechray.analysis.intervene`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

from mechray.analysis.readout import Readout

LOSS_FN_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def position_mask(t: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``mask`` (``[B, T]``) when ``t``'s leading dims are ``[..., B, T]`` (stacked copies
    allowed: ``[K * B, T]`` or ``[K, B, T]``), reshaped to ``t``'s leading dims; else ``None``."""
    if mask is None or t.dim() < 2:
        return None
    b, s = mask.shape
    if tuple(t.shape[:2]) == (b, s):
        return mask.to(t.device)
    if t.dim() >= 2 and t.shape[1] == s and t.shape[0] % b == 0 and t.shape[0] > b:
        return mask.to(t.device).repeat(t.shape[0] // b, 1)
    if t.dim() >= 3 and tuple(t.shape[1:3]) == (b, s):
        return mask.to(t.device).expand(t.shape[0], b, s)
    return None


def resolve_loss_fn(spec: Optional[str], ctx: Any) -> Optional[Callable]:
    """The user loss: ``"module:function"`` imported, else ``ctx.loss_fn``, else ``None``."""
    if spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"loss_fn={spec!r} cannot be imported ({exc}); give "
                             f"'package.module:function' of an importable callable") from exc
        if not callable(fn):
            raise ValueError(f"loss_fn={spec!r} is not callable")
        return fn
    return getattr(ctx, "loss_fn", None)


METRICS = ("mse", "kl", "loss", "lm_loss", "logit_diff", "prob")
POSITION = ("logit_diff", "prob")         # read at each example's last real token
READ_OUT = ("mse", "kl", "lm_loss", "logit_diff", "prob")   # computable through a lazy unembedding
LOSSES = ("loss", "lm_loss")              # |loss(intervened) - loss(clean)|


class Metric:
    """A change between outputs that accumulates over batches and stacked interventions.

    ``sums(out, ref)`` takes ``out`` as ``[K, B, ...]`` (K stacked interventions) and the clean
    reference ``[B, ...]``, and returns ``[K]`` partial sums; the metric over a data set is
    ``finish(total_sums / count)``.
    """

    def __init__(self, name: str, loss_fn: Optional[Callable] = None,
                 tokens: Optional[list[int]] = None):
        if name not in METRICS:
            raise ValueError(f"metric={name!r} is not one of {', '.join(METRICS)}")
        want = {"logit_diff": 2, "prob": 1}.get(name, 0)
        if len(tokens or []) != want:
            raise ValueError(f"metric={name!r} needs {want} token id(s) (answer_tokens=[correct, "
                             f"wrong] for logit_diff, target_token for prob), got {tokens}")
        self.tokens = torch.tensor(tokens or [], dtype=torch.long)
        if name == "loss" and loss_fn is None:
            raise ValueError("metric='loss' needs loss_fn='package.module:function' in the "
                             "analysis params (or ctx.loss_fn set in Python)")
        self.name, self.loss_fn, self.ref_loss = name, loss_fn, 0.0
        self.readout: Optional[Readout] = None   # outputs are hidden states: logits lazily
        self._gram: Optional[torch.Tensor] = None

    def read_out(self, readout: Optional[Readout]) -> "Metric":
        """Compare hidden states through ``readout`` (see :mod:`mechray.analysis.readout`):
        the same values as on the logits, without ``[B, T, vocab]`` tensors."""
        if readout is not None and self.name not in READ_OUT:
            raise ValueError(f"metric={self.name!r} needs the model's own outputs")
        self.readout = readout
        self._gram = readout.gram() if readout is not None and self.name == "mse" else None
        return self

    def reference(self, refs: list[torch.Tensor], masks: Optional[list] = None,
                  ids: Optional[list] = None) -> "Metric":
        """Set the clean loss (``metric='loss'``/``'lm_loss'``) from the clean outputs of every
        batch (with each batch's mask and token ids for ``lm_loss``)."""
        if self.name in LOSSES:
            masks = masks or [None] * len(refs)
            ids = ids or [None] * len(refs)
            with torch.no_grad():
                total = sum(float(self.sums(r[None], r, m, i)[0])
                            for r, m, i in zip(refs, masks, ids))
            self.ref_loss = total / max(sum(self.count(r, m, i)
                                            for r, m, i in zip(refs, masks, ids)), 1)
        return self

    def count(self, ref: torch.Tensor, mask: Optional[torch.Tensor] = None,
              ids: Optional[torch.Tensor] = None) -> int:
        """How many values ``sums`` adds up for ``ref`` (only real positions under ``mask``)."""
        m = position_mask(ref, mask)
        if self.name == "lm_loss":
            return int(_next_token_pairs(ref, mask).sum())
        if self.name in POSITION:
            return len(ref)
        if self.name == "mse" and self.readout is not None:
            positions = ref.numel() // ref.shape[-1] if m is None else \
                int(m.sum()) * (ref[0, 0].numel() // ref.shape[-1])
            return positions * self.readout.vocab
        if self.name == "mse":
            return ref.numel() if m is None else int(m.sum()) * (ref[0, 0].numel())
        if self.name == "kl":
            return ref.numel() // max(ref.shape[-1], 1) if m is None else \
                int(m.sum()) * (ref[0, 0].numel() // max(ref.shape[-1], 1))
        return len(ref)

    def sums(self, out: torch.Tensor, ref: torch.Tensor,
             mask: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """``[K]`` sums for ``out`` ``[K, B, ...]`` against ``ref`` ``[B, ...]``; with a mask
        ``[B, T]`` (the batch's ``attention_mask``) padded positions are not counted.  ``ids``
        (``[B, T]`` token ids): what ``lm_loss`` predicts (the next real token)."""
        out, ref = out.float(), ref.float()
        m = position_mask(ref, mask)
        if self.name == "lm_loss":
            return self._next_token_loss(out, mask, ids)
        if self.name in POSITION:
            return (self.score(out, mask) - self.score(ref[None], mask)).sum(1)
        if self.readout is not None:
            return self._read_sums(out, ref, m)
        if self.name == "mse":
            sq = (out - ref).pow(2)
            if m is not None:
                sq = sq * m.reshape(*m.shape, *([1] * (ref.dim() - 2)))
            return sq.flatten(1).sum(1)
        if self.name == "kl":
            logp_ref = ref.log_softmax(-1)
            kl = (logp_ref.exp() * (logp_ref - out.log_softmax(-1))).sum(-1)
            if m is not None:
                kl = kl * m.reshape(*m.shape, *([1] * (ref.dim() - 3)))
            return kl.flatten(1).sum(1)
        loss_fn = self.loss_fn
        assert loss_fn is not None  # make_metric refuses metric='loss' without one
        return torch.stack([torch.as_tensor(loss_fn(o)).float().reshape(()) * len(ref)
                            for o in out])

    def _read_sums(self, out: torch.Tensor, ref: torch.Tensor,
                   m: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`sums` of hidden states ``out`` ``[K, B, ..., d]`` / ``ref`` ``[B, ..., d]``
        through the readout: MSE exactly via ``W^T W``, KL over chunks of real positions."""
        assert self.readout is not None
        if self.name == "mse":
            assert self._gram is not None
            diff = out - ref                  # float32: [K, B, T, d], no vocabulary dimension
            sq = ((diff @ self._gram.to(diff.device, torch.float32)) * diff).sum(-1)
            if m is not None:
                sq = sq * m.reshape(*m.shape, *([1] * (ref.dim() - 3)))
            return sq.flatten(1).sum(1).float()
        k, d = out.shape[0], ref.shape[-1]
        rows = ref.reshape(-1, d)
        outs = out.reshape(k, -1, d)
        if m is not None:
            keep = m.reshape(-1).nonzero().flatten() if m.dim() == 2 else \
                m.expand(*ref.shape[:-1]).reshape(-1).nonzero().flatten()
            rows, outs = rows[keep], outs[:, keep]
        chunk = max(1, (1 << 24) // (self.readout.vocab * (k + 1)))   # ~64 MB of logits
        total = torch.zeros(k, device=out.device)
        for i in range(0, len(rows), chunk):
            logp_ref = self.readout.logits(rows[i:i + chunk]).log_softmax(-1)
            logp = self.readout.logits(outs[:, i:i + chunk]).log_softmax(-1)
            total = total + (logp_ref.exp() * (logp_ref - logp)).sum((-1, -2))
        return total

    def _next_token_loss(self, out: torch.Tensor, mask: Optional[torch.Tensor],
                         ids: Optional[torch.Tensor]) -> torch.Tensor:
        """``[K]`` sums of the next-token cross-entropy of outputs ``[K, B, T, vocab or d]``
        over positions whose next position is real too, in chunks (~64 MB of logits)."""
        if ids is None:
            raise ValueError("metric='lm_loss' needs token ids: eval inputs with input_ids (a "
                             "tokenizer's encoding, or texts with a tokenizer)")
        if out.dim() != 4 or tuple(ids.shape) != tuple(out.shape[1:3]):
            raise ValueError(f"metric='lm_loss' needs [batch, seq, vocab] outputs matching the "
                             f"token ids {list(ids.shape)}, got {list(out.shape[1:])}; use a "
                             f"causal LM (logits as its first output) or another metric")
        k = out.shape[0]
        keep = _next_token_pairs(out[0], mask).to(out.device)             # [B, T - 1]
        rows = out[:, :, :-1][:, keep]                                    # [K, N, vocab or d]
        target = ids.to(out.device)[:, 1:][keep]                          # [N]
        width = self.readout.vocab if self.readout is not None else out.shape[-1]
        chunk = max(1, (1 << 24) // (width * k))
        total = torch.zeros(k, device=out.device)
        for i in range(0, len(target), chunk):
            part = rows[:, i:i + chunk]
            logits = self.readout.logits(part) if self.readout is not None else part.float()
            picked = logits.gather(-1, target[i:i + chunk].expand(k, -1)[..., None])[..., 0]
            total = total + (logits.logsumexp(-1) - picked).sum(-1)
        return total

    def score(self, out: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``[K, B]`` position metric of outputs ``[K, B, T, ...]`` at each example's last real
        token (``mask`` ``[B, T]``; left or right padding): the logit difference of
        ``tokens[0]`` over ``tokens[1]``, or the probability of ``tokens[0]``."""
        k, b, t = out.shape[:3]
        if mask is None:
            last = torch.full((b,), t - 1, dtype=torch.long)
        else:
            m = mask.bool().cpu()
            last = t - 1 - m.flip(1).long().argmax(1)      # the last True of each row
        rows = out[:, torch.arange(b), last.to(out.device)]          # [K, B, d or vocab]
        logits = self.readout.logits(rows) if self.readout is not None else rows.float()
        ids = self.tokens.to(logits.device)
        if self.name == "logit_diff":
            return logits[..., ids[0]] - logits[..., ids[1]]
        return logits.log_softmax(-1)[..., ids[0]].exp()

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        if self.name in POSITION:
            return mean.abs()
        return (mean - self.ref_loss).abs() if self.name in LOSSES else mean

    def finish_grad(self, mean: float) -> float:
        """d finish / d mean, for attribution (the loss metric is ``|mean - ref|``)."""
        if self.name in POSITION:
            return 1.0 if mean >= 0 else -1.0
        return (1.0 if mean >= self.ref_loss else -1.0) if self.name in LOSSES else 1.0

    def negligible(self, value: float, refs: list[torch.Tensor]) -> bool:
        """Whether ``value`` is within float rounding of 0 for outputs like ``refs``."""
        if self.name == "kl":
            return value <= 1e-9
        if self.name in POSITION:
            return value <= 1e-7
        if self.name in LOSSES:
            return value <= 1e-6 * max(abs(self.ref_loss), 1e-6)
        if self.readout is not None and self._gram is not None:
            power = sum(float(((r.double() @ self._gram) * r.double()).sum()) for r in refs) / \
                max(sum(r.numel() // r.shape[-1] for r in refs) * self.readout.vocab, 1)
            return value <= 1e-10 * max(power, 1e-6)
        power = sum(float(r.float().pow(2).sum()) for r in refs) / \
            max(sum(r.numel() for r in refs), 1)
        return value <= 1e-10 * max(power, 1e-6)

    def value(self, out: torch.Tensor, ref: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> float:
        """The change from ``ref`` to ``out`` (both ``[B, ...]``) on one batch."""
        return float(self.finish(self.sums(out[None], ref, mask)[0] / self.count(ref, mask)))


def _next_token_pairs(ref: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T - 1]`` bool: position ``t`` predicts a real token ``t + 1`` from a real one."""
    b, t = ref.shape[:2]
    if mask is None:
        return torch.ones(b, max(t - 1, 0), dtype=torch.bool)
    m = mask.bool().cpu()
    return m[:, :-1] & m[:, 1:]


def make_metric(name: str, loss_fn: Optional[Callable] = None,
                tokens: Optional[list[int]] = None) -> Metric:
    return Metric(name, loss_fn, tokens)
