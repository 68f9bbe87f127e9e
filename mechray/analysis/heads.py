"""Attention heads: per-head attention patterns, and the "which heads matter" table.

Usage::

    from mechray.analysis.heads import attention_patterns, head_table

    pattern = attention_patterns(model, "transformer.h.1.attn", enc)   # [B, n_head, T, T]
    pattern[0, 3, -1]          # where head 3 attends from example 0's last token

    layers = [f"transformer.h.{i}.attn:heads" for i in range(n_layer)]
    results = runner.run_mechint_eval(eval_data=PromptPairs(clean, corrupt), layers=layers)
    head_table(results["circuit"])[:5]   # [{"layer": ..., "head": 3, "effect": 0.81, ...}, ...]

Patterns are read from the attention module's output, which HF attention returns as
``(attn_output, attn_weights)``; the weights exist only under eager attention, so the call
switches the model to ``attn_implementation="eager"`` (and ``output_attentions``) for its one
forward pass, and back, when the module returned none.  Rows (queries) and columns (keys) at
padded positions are zeroed, so left and right padding give the same pattern for each example's
real tokens; indices are the batch's padded positions (``enc["attention_mask"]`` says which
are real).  The per-head outputs themselves are the capture point ``name:heads``
(:mod:`mechray.capture.heads`); ``causal`` and ``circuit`` on such a layer rank heads, and
:func:`head_table` merges those rankings over layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from mechray.analysis.inputs import as_inputs
from mechray.analysis.intervene import eval_mode, find_module
from mechray.capture.layers import split_point


def attention_patterns(model: nn.Module, layer: str, inputs: Any) -> torch.Tensor:
    """``[batch, n_head, T, T]`` attention weights of attention module ``layer`` on ``inputs``
    (anything ``eval_data`` takes, e.g. a tokenizer's encoding), padded positions zeroed; one
    forward pass, without gradients, with the hook always removed."""
    module = find_module(model, split_point(layer)[0])
    x = as_inputs(inputs, 1 << 40)
    got: list[torch.Tensor] = []

    def keep(m: nn.Module, args: Any, out: Any) -> None:
        for w in out[1:] if isinstance(out, tuple) else ():    # (output, [cache,] weights)
            if isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[0] == len(x) and \
                    w.shape[-1] == w.shape[-2]:
                got.append(w.detach().float())
                return

    def run() -> None:
        handle = module.register_forward_hook(keep)
        try:
            with torch.no_grad(), eval_mode(model):
                x(model)
        finally:
            handle.remove()
    run()
    if not got:
        with _eager(model, layer):
            run()
    if not got:
        raise ValueError(f"layer {layer!r} ({type(module).__name__}) returned no attention "
                         f"weights, even under eager attention; name an attention module "
                         f"whose output is (attn_output, attn_weights), e.g. "
                         f"'transformer.h.1.attn' (GPT-2) or 'encoder.layer.1.attention.self'")
    pattern = got[0].cpu()
    m = x.mask
    if m is not None and tuple(m.shape) == (pattern.shape[0], pattern.shape[-1]):
        m = m.float()
        pattern = pattern * m[:, None, :, None] * m[:, None, None, :]
    return pattern


@contextmanager
def _eager(model: nn.Module, layer: str) -> Iterator[None]:
    """The model (the outermost HF model in it, e.g. inside a LightningModule) under eager
    attention; its attention implementation is restored after."""
    hf = next((m for m in model.modules() if callable(getattr(m, "set_attn_implementation", None))
               and getattr(m, "config", None) is not None), None)
    config = getattr(hf, "config", None)
    setter = getattr(hf, "set_attn_implementation", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or not callable(setter):
        raise ValueError(f"layer {layer!r} returned no attention weights and the model cannot be "
                         f"switched to eager attention; load it with "
                         f"attn_implementation='eager'")
    asked = getattr(config, "output_attentions", None)
    setter("eager")
    config.output_attentions = True       # older transformers return weights only when asked
    try:
        yield
    finally:
        setter(old)
        config.output_attentions = asked


def head_table(per_layer: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ranked head of ``causal`` or ``circuit`` results (``{layer: result}``) over
    ``:heads`` layers, largest effect first: ``{"layer", "head", "effect", ...}`` (with
    ``exact``/``attribution`` when the result has them); skipped layers are left out."""
    rows = [{"layer": layer, **entry} for layer, result in per_layer.items()
            if isinstance(result, dict) and not result.get("skipped")
            for entry in result.get("ranked") or [] if "head" in entry]
    return sorted(rows, key=lambda r: (-r["effect"], r["layer"], r["head"]))
