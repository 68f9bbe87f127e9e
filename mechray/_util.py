"""Small helpers every package uses, written once (at the bottom of the import flow: this
module imports nothing of mechray's).

Usage::

    from mechray._util import json_safe, safe_name

    json_safe({"ev": float("nan"), "rows": np.int64(3)})   # {"ev": None, "rows": 3}
    safe_name("blocks.0/attn")                              # "blocks.0_attn"
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """Plain JSON types only: tensors and arrays to lists, numpy scalars to Python ones,
    NaN/inf to ``None``, paths to strings, keys to strings."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (np.bool_, np.generic)):
        return json_safe(value.tolist())             # torch.Tensor, np.ndarray
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def safe_name(layer: str) -> str:
    """A file-name-safe form of a layer name (``blocks.0/attn`` -> ``blocks.0_attn``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", layer).strip(".") or "layer"
    return name[:200]
