"""Interventions on a model's layers: edit outputs with hooks that always come off, run eval
inputs in batches, and measure how much the model's output changed.

Usage::

    from mechray.analysis.intervene import edit_output, record_outputs, run_model, make_metric

    with edit_output(model, "popt", lambda t, call: t * 0):      # zero-ablate the layer
        ablated = run_model(model, x, batch_size=64)
    with record_outputs(model, "popt") as acts:                  # one tensor per module call
        model(x)
    metric = make_metric("mse")                                  # or "kl", or "loss" + loss_fn
    change = metric.value(ablated, run_model(model, x))

For tuple, list or dict outputs the first tensor is edited (the tensor capture stores, see
``mechray.capture.layers.pick_tensor``); the rest of the output passes through untouched.  A module called
several times per forward sees the call index, so call ``i`` can be patched with recording ``i``.

A user loss (``metric='loss'``) comes from the analysis parameter ``loss_fn="package.module:fn"``
(an importable callable, never unpickled), or else from an attribute ``ctx.loss_fn`` set in
Python.  It gets the model's outputs for a batch and returns a scalar; the change is
``|loss(intervened) - loss(clean)|`` averaged over batches.  ``metric='lm_loss'`` needs no
callable: the model's next-token cross-entropy on the inputs' ``input_ids`` (or
``ModelInputs.ids``), over positions whose next token is real.

A layer ending ``:heads`` edits an attention module's per-head outputs (the output projection's
input, :mod:`mechray.capture.heads`); :func:`sweep` with ``unit=d_head`` edits one head per unit.
"""

from __future__ import annotations

import copy
import itertools
import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from mechray.analysis.base import Skip
from mechray.analysis.inputs import (  # noqa: F401  (model_device, output_of: also here)
    ModelInputs,
    as_inputs,
    model_device,
    output_of,
    stored_inputs,
)
from mechray.analysis.metric import (  # noqa: F401  (the metric's names: also here)
    LOSS_FN_PATTERN,
    LOSSES,
    METRICS,
    POSITION,
    READ_OUT,
    Metric,
    make_metric,
    position_mask,
    resolve_loss_fn,
)
from mechray.capture.heads import head_point
from mechray.capture.layers import HEADS, INPUT, module_input, pick_tensor, resolve_layers

log = logging.getLogger(__name__)


def find_module(model: nn.Module, layer: str) -> nn.Module:
    """The one module ``layer`` names (exact name, or a unique suffix); errors list close names."""
    found = resolve_layers(model, [layer])
    if len(found) != 1:
        raise KeyError(f"layer {layer!r} matches {len(found)} modules ({', '.join(found)}); "
                       f"name exactly one module")
    return next(iter(found.values()))


def replace_first(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its first tensor (the one ``pick_tensor`` finds) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, dict):
        for key, value in output.items():
            if pick_tensor(value, None) is not None:
                out = copy.copy(output)
                out[key] = replace_first(value, new)
                return out
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            if pick_tensor(value, None) is not None:
                items = list(output)
                items[i] = replace_first(value, new)
                if isinstance(output, list):
                    return items
                return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    else:
        for key, value in getattr(output, "__dict__", {}).items():
            if pick_tensor(value, None) is not None:
                out = copy.copy(output)
                setattr(out, key, replace_first(value, new))
                return out
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor to edit")


@contextmanager
def edit_output(model: nn.Module, layer: str,
                fn: Callable[[torch.Tensor, int], Optional[torch.Tensor]]) -> Iterator[nn.Module]:
    """``with edit_output(model, layer, fn): model(x)`` runs with the layer's first output tensor
    replaced by ``fn(tensor, call_index)`` (``None`` keeps it); the hook is always removed."""
    module = find_module(model, layer)
    calls = itertools.count()
    reads_input = layer.endswith(INPUT)
    if layer.endswith(HEADS):            # per-head outputs: the projection's input (or output)
        point = head_point(module, layer)
        module, reads_input = point.module, point.reads_input
    if reads_input:                      # the module's input (``name:input``) is edited
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            tensor = module_input(args, kwargs)
            if tensor is None:
                raise TypeError(f"layer {layer!r}: the module got no tensor input")
            new = fn(tensor, next(calls))
            if new is None or new is tensor:
                return None
            args = tuple(new if a is tensor else a for a in args)
            kwargs = {k: new if v is tensor else v for k, v in kwargs.items()}
            return args, kwargs
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield module
        finally:
            handle.remove()
        return

    def hook(mod: nn.Module, inputs: Any, output: Any) -> Any:
        tensor = pick_tensor(output, None)
        if tensor is None:
            raise TypeError(f"layer {layer!r} returned {type(output).__name__} with no tensor")
        new = fn(tensor, next(calls))
        return None if new is None or new is tensor else replace_first(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield module
    finally:
        handle.remove()


@contextmanager
def record_outputs(model: nn.Module, layer: str, detach: bool = True) -> Iterator[list]:
    """``with record_outputs(model, layer) as acts: model(x)``; ``acts[i]`` is call ``i``'s."""
    acts: list[torch.Tensor] = []

    def keep(t: torch.Tensor, call: int) -> None:
        acts.append(t.detach() if detach else t)

    with edit_output(model, layer, keep):
        yield acts


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in ``eval()`` (no dropout, fixed norms); every module's training flag is restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def run_model(model: nn.Module, x: "torch.Tensor | ModelInputs", batch_size: int = 64
              ) -> torch.Tensor:
    """Outputs (first tensor) for ``x`` in consecutive batches under ``torch.no_grad()``, on the
    model's device (``x`` a tensor or :class:`ModelInputs` of one sequence length)."""
    x = x if isinstance(x, ModelInputs) else ModelInputs(x)
    with torch.no_grad():
        return torch.cat([output_of(x.select(slice(i, i + batch_size))(model)).float()
                          for i in range(0, len(x), batch_size)])


def forward(model: nn.Module, x: ModelInputs) -> torch.Tensor:
    """The model's output (first tensor, float) on one batch, without gradients."""
    with torch.no_grad():
        return output_of(x(model)).float()


def model_of(ctx: Any) -> nn.Module:
    """``ctx.model``, or :class:`Skip` saying how to pass one."""
    if ctx.model is None:
        raise Skip("no model: pass the model to EvalMechIntRunner(model, config)")
    return ctx.model


def eval_inputs(ctx: Any, n: int) -> ModelInputs:
    """Up to ``n`` model inputs: ``ctx.eval_data`` (anything :func:`as_inputs` takes) or inputs
    saved with the shards (``save_inputs=True``); raises :class:`Skip` naming what is missing."""
    model_of(ctx)
    if ctx.eval_data is not None:
        return as_inputs(ctx.eval_data, n)
    x = stored_inputs(ctx.store, n) if ctx.store is not None else None
    if x is None:
        raise Skip("no eval inputs: pass eval_data to run_mechint_eval(...), or capture with "
                   "save_inputs=True so shards hold the model inputs")
    return x


Fill = Callable[[int, int, int], torch.Tensor]   # (batch index, call index, positions) -> [P, d]


def edit_neurons(t: torch.Tensor, neurons: Optional[torch.Tensor], values: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, unit: int = 1) -> torch.Tensor:
    """A copy of ``t`` (``[K * B, ..., d]``) where stacked copy ``k`` has neuron ``neurons[k]``
    set from ``values`` (``[P, d]`` per copy); ``neurons=None`` sets every neuron (K = 1).  With
    ``mask`` (the batch's ``[B, T]``), padded positions keep their values.  ``unit > 1`` edits
    blocks of ``unit`` features (attention heads): index ``j`` sets features
    ``j * unit .. (j + 1) * unit``."""
    d = t.shape[-1]
    k = 1 if neurons is None else len(neurons)
    flat = t.reshape(k, -1, d).clone()
    values = values.to(device=t.device, dtype=t.dtype).expand(flat.shape[1], d)
    if neurons is None:
        flat[0] = values
    else:
        cols = (neurons.to(t.device)[:, None] * unit +
                torch.arange(unit, device=t.device)[None])                  # [K, unit]
        rows = torch.arange(k, device=t.device)[:, None].expand_as(cols)
        flat[rows, :, cols] = values[:, cols].permute(1, 2, 0)             # [K, unit, P]
    out = flat.reshape(t.shape)
    m = position_mask(t, mask)
    if m is not None:
        out = torch.where(m.reshape(*m.shape, *([1] * (t.dim() - 2))), out, t)
    return out


Batch = tuple[ModelInputs, torch.Tensor]   # (model inputs, clean reference output)


class Prefix:
    """The outputs of the modules that finish before ``layer`` starts, for one batch, so runs
    that edit ``layer`` (or later) can skip recomputing them.

    ``Prefix.record(model, layer, x)`` runs ``x`` once with hooks on every module; a module
    qualifies when it ran exactly once, ended before ``layer``'s first call began, is neither an
    ancestor nor a descendant of ``layer``, and returned a tensor or a tuple of tensors that
    nothing changed in place afterwards.  ``layer`` itself qualifies when it ran once: its clean
    output is replayed and then edited, so a run computes only what comes after the layer.
    Only the outermost qualifying modules are kept.  ``with prefix.reused(k):`` then makes each
    of them return its recorded output (batch dimension repeated ``k`` times for stacked
    copies) instead of running.  :func:`sweep` checks on the first batch that the model's output
    is unchanged by this and otherwise runs the whole model.
    """

    def __init__(self, outputs: list[tuple[nn.Module, Any]], batch: int):
        self.outputs, self.batch = outputs, batch

    @classmethod
    def record(cls, model: nn.Module, layer: str, x: ModelInputs
               ) -> tuple["Prefix", torch.Tensor]:
        target = find_module(model, layer)
        mods = [(n, m) for n, m in model.named_modules() if n]
        tname = next((n for n, m in mods if m is target), None)
        events: list[tuple[str, str]] = []
        outs: dict[str, Any] = {}
        calls: dict[str, int] = {}
        handles = []

        def pre(name):
            def hook(m, args):
                events.append(("s", name))
                calls[name] = calls.get(name, 0) + 1
            return hook

        def post(name):
            def hook(m, args, out):
                events.append(("e", name))
                if _plain(out):       # later in-place changes are caught by the versions
                    v = _versions(out)
                    outs[name] = (out, v) if v is not None else (_copy(out), None)
                else:
                    outs[name] = None
            return hook
        try:
            for n, m in mods:
                handles.append(m.register_forward_pre_hook(pre(n)))
                handles.append(m.register_forward_hook(post(n)))
            y = forward(model, x)
        finally:
            for h in handles:
                h.remove()
        if tname is None or ("s", tname) not in events:
            return cls([], len(x)), y
        begin = events.index(("s", tname))
        ended = {n for kind, n in events[:begin] if kind == "e"}
        if calls.get(tname) == 1 and not layer.endswith((INPUT, HEADS)):
            ended.add(tname)                 # the layer itself: its clean output, then the edit
        ok = {n for n in ended if calls.get(n) == 1 and outs.get(n) is not None
              and outs[n][1] in (None, _versions(outs[n][0]))   # not changed in place later
              and not tname.startswith(n + ".") and not n.startswith(tname + ".")}
        keep = [n for n in ok if not any(n.startswith(a + ".") for a in ok)]
        by_name = dict(mods)
        return cls([(by_name[n], _copy(outs[n][0])) for n in sorted(keep)], len(x)), y

    @contextmanager
    def reused(self, k: int = 1) -> Iterator[None]:
        saved = []
        try:
            for module, out in self.outputs:
                value = _repeat_batch(out, k, self.batch)
                saved.append((module, module.__dict__.get("forward")))
                module.forward = lambda *a, _v=value, **kw: _v
            yield
        finally:
            for module, old in saved:
                if old is None:
                    del module.forward
                else:
                    module.forward = old


def _plain(out: Any) -> bool:
    return isinstance(out, torch.Tensor) or (isinstance(out, tuple) and type(out) is tuple and
                                             all(isinstance(v, torch.Tensor) or v is None
                                                 for v in out))


def _versions(out: Any) -> Optional[tuple[int, ...]]:
    """In-place modification counters of a plain output's tensors (changed: not reusable);
    ``None`` for inference-mode tensors, which keep none."""
    try:
        if isinstance(out, torch.Tensor):
            return (out._version,)
        return tuple(-1 if v is None else v._version for v in out)
    except RuntimeError:
        return None


def _copy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    return tuple(None if v is None else v.detach().clone() for v in out)


def _repeat_batch(out: Any, k: int, batch: int) -> Any:
    """``out`` with its batch dimension repeated ``k`` times (always a fresh copy)."""
    if k == 1:
        return _copy(out)
    if isinstance(out, torch.Tensor):
        return out.repeat(k, *([1] * (out.dim() - 1))) if out.dim() and len(out) == batch else out
    return tuple(_repeat_batch(v, k, batch) if v is not None else None for v in out)


def prefixes(model: nn.Module, layer: str, batches: list[Batch], stack: int = 2
             ) -> list[Optional[Prefix]]:
    """One :class:`Prefix` per batch, or ``None`` each when reusing them would change the
    model's output on the first batch (checked with ``stack`` stacked copies)."""
    return clean_runs(model, layer, [x for x, _ in batches], stack)[1]


def clean_runs(model: nn.Module, layer: str, xs: list[ModelInputs], stack: int = 2,
               reuse: bool = True) -> tuple[list[Batch], list[Optional[Prefix]]]:
    """One clean forward per batch: ``(batches, skips)`` for :func:`sweep`, where ``batches``
    pairs each input batch with its clean output and ``skips`` holds its :class:`Prefix` (all
    ``None`` without ``reuse`` or when replaying them would change the output of the first
    batch, checked with ``stack`` stacked copies)."""
    batches: list[Batch] = []
    skips: list[Optional[Prefix]] = []
    for b, x in enumerate(xs):
        if not reuse:
            batches.append((x, forward(model, x)))
            skips.append(None)
            continue
        prefix, y = Prefix.record(model, layer, x)
        batches.append((x, y.float()))
        skips.append(prefix)
        if b == 0 and not _replays(model, layer, prefix, x, y, stack):
            reuse = False
            skips[0] = None
    return batches, skips


def _replays(model: nn.Module, layer: str, prefix: Prefix, x: ModelInputs, y: torch.Tensor,
             stack: int) -> bool:
    """Whether running ``x`` (``stack`` copies) with ``prefix`` replayed gives ``y`` again."""
    if not prefix.outputs:
        return False
    with torch.no_grad(), prefix.reused(stack):
        again = output_of(x.repeat(stack)(model))
    want = y.repeat(stack, *([1] * (y.dim() - 1)))
    if again.shape != want.shape or not torch.allclose(again.float(), want.float(),
                                                       rtol=1e-4, atol=1e-5):
        log.info("mechray: %s: the modules up to it cannot be replayed; running the whole "
                 "model per intervention", layer)
        return False
    return True


def sweep(model: nn.Module, layer: str, batches: list[Batch], fill: Fill, metric: Metric,
          neurons: Optional[torch.Tensor] = None, stack: int = 1,
          progress: Optional[str] = None, reuse: bool = True,
          skip: Optional[list[Optional[Prefix]]] = None, unit: int = 1) -> torch.Tensor:
    """The metric for each neuron edited alone (``[len(neurons)]``), or for the whole layer
    edited (``neurons=None``, a 1-element tensor).

    ``batches`` holds ``(model inputs, clean reference output)`` pairs; each run edits the
    layer's output with ``fill`` (real positions only, when the inputs carry a mask) and
    compares the model output with the reference at real positions.  ``stack`` neurons share
    one forward pass by stacking copies of the batch (only where :func:`can_stack`).  With
    ``reuse`` the modules that finish before ``layer`` are not re-run (see :class:`Prefix`;
    ``skip``, from :func:`prefixes`, saves recording them again for the same batches).
    ``progress`` (a label) shows a bar over the forward passes.  ``unit``: features per
    edited unit (an attention head's ``d_head`` on a ``:heads`` layer; see :func:`edit_neurons`).
    """
    from tqdm.auto import tqdm

    groups = [None] if neurons is None else list(torch.split(neurons, max(stack, 1)))
    out = []
    bar = tqdm(total=len(groups) * len(batches), desc=progress, unit="pass", leave=False,
               disable=progress is None)
    if skip is None:
        skip = prefixes(model, layer, batches) if reuse else [None] * len(batches)
    with torch.no_grad(), bar:
        for group in groups:
            k = 1 if group is None else len(group)
            total = torch.zeros(k)
            count = 0
            for b, (x, ref) in enumerate(batches):
                mask = x.mask

                def fn(t: torch.Tensor, call: int, b=b, group=group, mask=mask) -> torch.Tensor:
                    positions = t.numel() // (t.shape[-1] * k)
                    return edit_neurons(t, group, fill(b, call, positions), mask, unit)

                pre = skip[b]
                with edit_output(model, layer, fn), \
                        pre.reused(k) if pre is not None else nullcontext():
                    y = output_of(x.repeat(k)(model))
                ids = x.targets
                total += metric.sums(y.reshape(k, *ref.shape), ref.to(y.device), mask,
                                     ids).cpu()
                count += metric.count(ref, mask, ids)
                bar.update(1)
            out.append(metric.finish(total / max(count, 1)))
    return torch.cat(out)


def can_stack(model: nn.Module, layer: str, x: ModelInputs) -> bool:
    """Whether stacking copies of a batch is sound here: the layer's outputs and the model's
    output keep the batch in dim 0, and rows do not mix (a batch's outputs equal its rows run
    one at a time), so each stacked copy sees only its own edit."""
    n = min(len(x), 4)
    if n < 2:
        return False
    x = x.select(slice(0, n))
    with torch.no_grad():
        with record_outputs(model, layer) as acts:
            y = output_of(x(model))
        if y.shape[:1] != (n,) or not acts or any(a.shape[:1] != (n,) for a in acts):
            return False
        alone = [output_of(x.select(slice(i, i + 1))(model)) for i in range(n)]
    ok = all(a.shape == y[i:i + 1].shape for i, a in enumerate(alone)) and torch.allclose(
        torch.cat(alone).float(), y.float(), rtol=1e-4, atol=1e-5)
    if not ok:
        log.info("mechray: %s: the model mixes rows of a batch; ablating one neuron per pass",
                 layer)
    return ok
