"""Skip reasons worded for an HTTP client: which request field to send, or how to start the server.

Usage::

    from mechray.api.skips import for_http, ServerCan

    can = ServerCan.of(model, tokenizer)       # what this server can do: model, texts
    for_http("causal", result, can)            # rewrites result["reason"] in place

The analyses word a skip for Python (``pass eval_data to run_mechint_eval(...)``); over HTTP the
reader can neither pass Python arguments nor change how the store was captured, so a skipped
``causal``/``circuit``/``sae`` splice is reworded by its cause: no model on the server (start
``mechray serve --model ...``), no eval inputs (send ``eval_inputs.texts``, or
``eval_inputs.input_ids`` when the server has no tokenizer that encodes), no prompt pairs (send
``eval_inputs.corrupt_texts``).  Other reasons (a layer the metric cannot use, ...) are left as
the analysis wrote them; the original goes to ``reason_python`` when one is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START = ("start the server with `mechray serve --model package.module:factory --tokenizer "
         "NAME` (or give the model to FastAPIIntegrationMixin(model, config, tokenizer=...))")


@dataclass(frozen=True)
class ServerCan:
    """What the server can do for analyses that run the model."""

    model: bool
    texts: bool          # a tokenizer that encodes: eval_inputs.texts are accepted

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> "ServerCan":
        return cls(model is not None, encodes(tokenizer))

    def inputs_hint(self) -> str:
        if self.texts:
            return ('send "eval_inputs": {"texts": ["a sentence", ...]} with the request (the '
                    "dashboard's eval texts box)")
        return ('send "eval_inputs": {"input_ids": [[101, 2023, ...], ...]} with the request, '
                "or start the server with --tokenizer NAME to send texts")


def encodes(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` turns texts into ids (a transformers tokenizer), not only decodes."""
    return tokenizer is not None and callable(getattr(tokenizer, "encode", None)) and \
        callable(tokenizer)


def http_reason(analysis: str, reason: str, can: ServerCan) -> str:
    """``reason`` reworded for an HTTP client (unchanged when it is not about model inputs)."""
    text = reason.lower()
    if not can.model and ("needs the model" in text or "no model" in text):
        return f"{analysis} runs the model, and this server has none; {START} to enable it"
    if "no eval inputs" in text:
        return (f"{analysis} needs model inputs and the store holds none (captured without "
                f"save_inputs); {can.inputs_hint()}")
    if "prompt pairs" in text:
        pairs = ('send "eval_inputs": {"texts": [...], "corrupt_texts": [...]} (one corrupted '
                 "text per clean one)") if can.texts else \
            "start the server with --tokenizer NAME and send eval_inputs.texts with corrupt_texts"
        return f"{analysis}: {reason.split(':', 1)[0]}; {pairs}"
    return reason


def for_http(analysis: str, result: Any, can: ServerCan) -> None:
    """Reword ``result``'s skip reason (and its SAE splice's) in place."""
    if not isinstance(result, dict):
        return
    for part in (result, result.get("splice")):
        if isinstance(part, dict) and part.get("skipped") and isinstance(part.get("reason"), str):
            new = http_reason(analysis, part["reason"], can)
            if new != part["reason"]:
                part["reason_python"], part["reason"] = part["reason"], new
