"""One interpretation request as the routes hand it on: typed, built once per HTTP request.

Usage::

    from mechray.api.request import Request

    request = Request("neuron", "popt", {"top_k": 8})          # what POST /interpret builds
    request = Request.of({"analysis_type": "neuron", "layer_name": "popt"})   # the dict form
    plan = planner.plan(request)                                # every 4xx check, once

The route validates the HTTP body (:class:`~mechray.api.schema.InterpretRequest`, or the upload
form) and builds this object; the service, the planner, the job board and Serve's replicas all
receive it, never a dict.  ``params`` are the analysis's parameters as sent: the planner checks
them (no code-importing ones over HTTP) and validates them into the analysis's ``Params`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from mechray.api.uploads import Upload

__all__ = ["Request"]


@dataclass(frozen=True)
class Request:
    """What to run: an analysis on a captured layer, or on an upload's layers."""

    analysis: str                                   # a registered analysis name
    layer: Optional[str] = None                     # None: every layer of an upload
    params: Any = field(default_factory=dict)       # as sent (the planner validates them)
    upload: Optional[Upload] = None                 # parsed activations of POST /upload
    eval_inputs: Optional[dict[str, Any]] = None    # model inputs (causal, circuit), as sent

    @classmethod
    def of(cls, value: "Request | Mapping[str, Any]") -> "Request":
        """``value`` itself, or a request from the HTTP body's field names (``analysis_type``,
        ``layer_name``, ``params``, ``upload``, ``eval_inputs``)."""
        if isinstance(value, Request):
            return value
        return cls(value["analysis_type"], value.get("layer_name"), value.get("params") or {},
                   value.get("upload"), value.get("eval_inputs"))
