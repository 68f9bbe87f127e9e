"""Resolve the names in ``sample_layers`` to modules of a model.

Usage::

    from mechray.capture.layers import resolve_layers

    modules = resolve_layers(model, ["mamba_backbone.blocks.*", "popt"])   # {name: module}

A name matches a module named exactly so in ``model.named_modules()``; a name with ``*``, ``?`` or
``[`` is a glob whose ``*`` stays within one dotted part (``blocks.*`` matches ``blocks.3``, not
``blocks.3.norm``; ``**`` spans parts); a name found nowhere but ending exactly one module name
(``popt`` for a LightningModule holding ``model.popt``) matches that module, and a glob found
nowhere matches the module names it ends (``blocks.*`` matches ``model.backbone.blocks.0``).
Anything else fails at registration with the closest real names.

A name ending ``:input`` (``transformer.h.1.ln_2:input``) is the module's input instead of its
output: its first positional tensor, else the first tensor among its keyword arguments (nnsight's
``.input``).  That reaches the residual stream between modules, e.g. for HF GPT-2 (TransformerLens
names): ``blocks.L.hook_resid_pre`` = ``transformer.h.L:input``, ``blocks.L.hook_resid_mid`` =
``transformer.h.L.ln_2:input``, ``blocks.L.hook_resid_post`` = ``transformer.h.L``.  A name ending ``:heads``
(``transformer.h.1.attn:heads``) is an attention module's per-head outputs
(``blocks.L.attn.hook_z``, see :mod:`mechray.capture.heads`).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Optional

import torch
from torch import nn

from mechray.errors import UnknownLayerError


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map every requested name (or glob) to ``{module name: module}``, in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"hooks go on a torch.nn.Module, got {type(model).__name__}; pass the "
                        "model (e.g. the first item of (model, tokenizer)), not its tokenizer "
                        "or a wrapper")
    modules = dict(model.named_modules())
    modules.pop("", None)
    found: dict[str, nn.Module] = {}
    for name in names:
        base, suffix = split_point(name)
        for match in _match(base, modules):
            found.setdefault(match + suffix, modules[match])
    order = {n: i for i, n in enumerate(modules)}
    rank = {INPUT: 0, "": 1, HEADS: 2}
    return dict(sorted(found.items(), key=lambda kv: (order[split_point(kv[0])[0]],
                                                      rank[split_point(kv[0])[1]])))


INPUT = ":input"
HEADS = ":heads"      # see mechray.capture.heads


def split_point(name: str) -> tuple[str, str]:
    """``("transformer.h.1.attn", ":heads")`` for ``"transformer.h.1.attn:heads"``; the suffix
    is ``""`` for a module's output."""
    for suffix in (INPUT, HEADS):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def module_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The tensor a ``name:input`` capture point reads: the first positional tensor, else the
    first tensor among the keyword arguments."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _match(name: str, modules: dict[str, nn.Module]) -> list[str]:
    if name in modules:
        return [name]
    if any(ch in name for ch in "*?["):
        exact, ends = _glob(name), _glob("**." + name)
        hits = [n for n in modules if exact.match(n)] or [n for n in modules if ends.match(n)]
        if hits:
            return hits
    else:
        suffix = [n for n in modules if n.endswith("." + name)]
        if len(suffix) == 1:
            return suffix
        if len(suffix) > 1:
            raise UnknownLayerError(
                f"layer {name!r} is ambiguous: it ends {len(suffix)} module names "
                f"({', '.join(suffix[:5])}); give the full name from model.named_modules()")
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.4)
    hint = f"closest module names: {', '.join(close)}" if close else \
        f"the model has modules such as {', '.join(list(modules)[:8])}"
    raise UnknownLayerError(
        f"layer {name!r} matches no module of the model; "
        f"{hint}. List them with: [name for name, _ in model.named_modules()]")



def _glob(pattern: str) -> "re.Pattern[str]":
    """Compile a dotted-name glob: ``*``/``?`` stay within one part, ``**`` spans parts."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:[^.]+\.)*")
            i += 3
            continue
        ch = pattern[i]
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def pick_tensor(output: Any, key: Any) -> Optional[torch.Tensor]:
    """The tensor to capture (or edit) in a module output: itself, ``output[key]``, or the first
    tensor found in a tuple, list, dict or ``ModelOutput`` (what captures and interventions agree on)."""
    if isinstance(output, torch.Tensor):
        return output
    if key is not None:
        try:
            value = output[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise KeyError(f"output_keys selects {key!r} but the module output "
                           f"({type(output).__name__}) has no such entry; fix output_keys") from exc
        return value if isinstance(value, torch.Tensor) else pick_tensor(value, None)
    values = output.values() if isinstance(output, dict) else \
        output if isinstance(output, (tuple, list)) else getattr(output, "__dict__", {}).values()
    for value in values:
        found = pick_tensor(value, None)
        if found is not None:
            return found
    return None
