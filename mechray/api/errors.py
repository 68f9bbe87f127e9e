"""API errors: one exception carrying an HTTP status and a JSON body that names the problem.

Usage::

    from mechray.api.errors import ApiError

    raise ApiError(404, "unknown_layer", "layer 'popt2' is not in ./mechint_cache; ...",
                   valid=["popt", "heads.decoder"])
    err.body()       # {"error": "unknown_layer", "message": "...", "valid": [...]}
    err.response()   # a starlette JSONResponse with that status and body

Every 4xx the API sends is one of these, and so is every 5xx: :meth:`ApiError.internal` logs
the exception under a request id and answers only that id, never a traceback, path or pid.
It subclasses Starlette's ``HTTPException`` so it passes through FastAPI's body parsing
unchanged (an oversize body stops the parser with 413), and :class:`mechray.errors.MechrayError`
so a caller of :func:`mechray.api.uploads.parse_upload` catches it with mechray's other errors.
``as_tuple``/``from_tuple`` carry it across a Ray Serve handle as plain data.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from mechray.errors import MechrayError


class ApiError(HTTPException, MechrayError):
    """An HTTP error whose JSON body says what was wrong and how to fix it."""

    def __init__(self, status: int, code: str, message: str, *,
                 valid: Optional[list[str]] = None, errors: Optional[list[dict]] = None,
                 headers: Optional[dict[str, str]] = None, request_id: Optional[str] = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status, self.code, self.message = status, code, message
        self.valid, self.errors, self.request_id = valid, errors, request_id

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.valid is not None:
            out["valid"] = list(self.valid)
        if self.errors is not None:
            out["errors"] = self.errors
        if self.request_id is not None:
            out["request_id"] = self.request_id
        return out

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def as_tuple(self) -> tuple:
        return ("err", self.status, self.body(), dict(self.headers or {}))

    @classmethod
    def from_tuple(cls, value: tuple) -> "ApiError":
        _, status, body, headers = value
        return cls(status, body["error"], body["message"], valid=body.get("valid"),
                   errors=body.get("errors"), headers=headers or None,
                   request_id=body.get("request_id"))

    @classmethod
    def internal(cls, what: str, logger: logging.Logger) -> "ApiError":
        """A 500 for a server bug: the exception being handled is logged with its traceback
        under a new request id; the body carries only that id (no traceback, path or pid)."""
        rid = uuid.uuid4().hex[:12]
        logger.exception("mechray: request %s: %s failed", rid, what)
        return cls(500, "internal_error", f"the server failed on this request (a bug, not your "
                   f"input); request id {rid} in the server log has the details", request_id=rid)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"
