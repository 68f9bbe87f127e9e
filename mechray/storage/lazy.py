"""Heavy modules imported on first use, so paths that only read manifests start without them.

Usage::

    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        import torch
    else:
        from mechray.storage.lazy import torch      # imported at the first ``torch.<name>``

``mechray ls`` and ``mechray sync`` read manifests only: importing torch (seconds on a loaded
machine) for them is pure start-up cost.  Modules on that path (``shard``, ``reader``) name torch
through this stand-in; every attribute is looked up on the real module each time, so a test's
``monkeypatch.setattr(torch, ...)`` is seen as with a plain ``import torch``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class LazyModule:
    """A stand-in for module ``name`` that imports it at the first attribute access."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._name)
        if module is None:
            module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"set {attr!r} on the real module ({self._name}), not on mechray's "
                             f"lazy stand-in for it")

    def __repr__(self) -> str:
        state = "imported" if self._name in sys.modules else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


torch = LazyModule("torch")
