"""Logit lens for features: the tokens a neuron's or SAE latent's direction promotes and
suppresses through the model's unembedding.

Usage::

    from mechray.analysis.lens import add_logit_lens

    add_logit_lens(results, model, decode, out_dir, k=8)   # {analysis: {layer: result}}, in place
    results["neuron"]["transformer.h.3"]["logit_lens"]
    # {"units": [17, 3, ...], "promoted": [[{"token": " Paris", "token_id": 6342,
    #   "logit": 0.41}, ...], ...], "suppressed": [[...], ...], "note": "..."}

For a layer whose width equals the unembedding's input (a residual-stream layer of a model with
``get_output_embeddings()``, an ``nn.Linear``), a unit's direction ``v`` (neuron ``j``: the unit
vector ``e_j``; SAE latent ``i``: ``W_dec[i]``) is mapped to ``W_U v`` (no final norm: the
direct effect Neuronpedia shows beside top contexts), and its ``k`` largest and smallest
entries are kept.  Neurons: the ``units`` strongest by their top activation (``top_k`` values),
SAE latents: those of ``top_activations``.  Other layers are left as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def unembedding(model: Optional[nn.Module]) -> Optional[nn.Linear]:
    """The model's output embedding when it is an ``nn.Linear`` (else ``None``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def lens(head: nn.Linear, directions: torch.Tensor, decode: Callable[[list[int]], str],
         k: int = 8) -> dict[str, list]:
    """Promoted and suppressed tokens for each row of ``directions`` (``[units, d]``)."""
    with torch.no_grad():
        w = head.weight.detach().float()
        logits = directions.to(w.device).float() @ w.T                 # [units, vocab]
        k = min(k, logits.shape[1])
        top, bottom = logits.topk(k, dim=1), (-logits).topk(k, dim=1)

    def rows(values: torch.Tensor, ids: torch.Tensor, sign: float) -> list:
        return [[{"token": decode([int(i)]), "token_id": int(i), "logit": sign * float(v)}
                 for v, i in zip(vs, idx)] for vs, idx in zip(values.cpu(), ids.cpu())]
    return {"promoted": rows(top.values, top.indices, 1.0),
            "suppressed": rows(bottom.values, bottom.indices, -1.0)}


def add_logit_lens(results: dict[str, dict[str, Any]], model: Optional[nn.Module],
                   decode: Callable[[list[int]], str], out_dir: Optional[Path] = None,
                   k: int = 8, units: int = 32) -> int:
    """Add ``logit_lens`` to the ``neuron`` and ``sae`` results of residual-stream layers;
    returns how many units got one."""
    head = unembedding(model)
    if head is None:
        return 0
    d = head.in_features
    done = 0
    for res in (results.get("neuron") or {}).values():
        if not isinstance(res, dict) or not isinstance(res.get("mean"), list) or \
                len(res["mean"]) != d:
            continue
        values = (res.get("top_k") or {}).get("values")
        order = list(range(d))
        if isinstance(values, list) and len(values) == d:
            order.sort(key=lambda u: -(values[u][0] if values[u] and values[u][0] is not None
                                       else float("-inf")))
        chosen = order[:units]
        res["logit_lens"] = {"units": chosen, **lens(head, torch.eye(d)[chosen], decode, k),
                             "note": "neuron direction through the unembedding, no final norm"}
        done += len(chosen)
    for layer, res in (results.get("sae") or {}).items():
        path = res.get("weights_path") if isinstance(res, dict) else None
        latents = (res.get("top_activations") or {}).get("latents")
        if not path or out_dir is None or not isinstance(latents, list) or not latents:
            continue
        from mechray.analysis.sae.model import load_sae

        try:
            w_dec = load_sae(Path(out_dir) / path).W_dec.detach()
        except (OSError, ValueError, KeyError) as exc:
            log.info("mechray: logit lens of %s skipped: %s", layer, exc)
            continue
        if w_dec.shape[1] != d:
            continue
        chosen = [int(i) for i in latents[:units]]
        res["logit_lens"] = {"units": chosen, **lens(head, w_dec[chosen], decode, k),
                             "note": "SAE decoder direction through the unembedding, no final "
                                     "norm"}
        done += len(chosen)
    return done


def markdown(per: dict[str, Any], units: int = 5, k: int = 5) -> list[str]:
    """Report lines: the promoted / suppressed tokens of the first ``units`` units per layer."""
    from mechray.analysis.contexts import escape_markdown

    lines: list[str] = []
    for layer, res in per.items():
        table = res.get("logit_lens") if isinstance(res, dict) else None
        if not table:
            continue
        lines += ["", f"Logit lens, `{layer}` (tokens each direction promotes / suppresses):", ""]
        for u, up, down in list(zip(table["units"], table["promoted"],
                                    table["suppressed"]))[:units]:
            show = lambda xs: ", ".join(escape_markdown(x["token"]) for x in xs[:k])  # noqa: E731
            lines.append(f"- unit {u}: + {show(up)} / − {show(down)}")
    return lines
