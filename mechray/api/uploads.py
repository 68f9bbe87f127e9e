"""Uploaded activation files: sniffed by content, loaded without ever running pickled code.

Usage::

    from mechray.api.uploads import parse_upload

    upload = parse_upload(data, filename="acts.pt", max_layers=64)
    upload.kind        # 'pt' | 'safetensors' | 'npy' | 'npz'  (from the bytes, not the name)
    upload.tensors     # {'popt': Tensor[rows, d], ...}   a bare tensor/array is layer 'upload'
    upload.sha256      # of the bytes: the cache key of the upload's results

Accepted, told apart by their first bytes:

- ``.pt`` written by ``torch.save`` (a zip archive holding ``data.pkl``), loaded with
  ``torch.load(weights_only=True)``: only tensors and plain containers; a pickle that names any
  other callable is refused before anything runs.  Entries must be stored uncompressed (as
  ``torch.save`` writes them) so the file cannot inflate beyond its size.
- ``.safetensors`` (an 8-byte little-endian header length, then a JSON header).
- ``.npy`` / ``.npz`` (``np.save`` / ``np.savez``), loaded with ``allow_pickle=False``; an
  ``.npz`` may not inflate to more than ``header.NPZ_EXPANSION`` times its size.

Before anything is loaded, the file's header is checked (:mod:`mechray.api.header`): at most
``max_layers`` layers, dtypes in ``header.SUPPORTED_DTYPES`` (integers and bool become
float32), dense layouts, no view larger than the values the file carries.

A dict of layers (``{name: tensor}``, or a whole mechray shard ``{'activations': {...}}``) or a
single tensor.  Rows are flattened as capture does: ``[..., d] -> [rows, d]``.  Raw pickles,
legacy ``torch.save`` files, object arrays and anything else are refused with a 4xx
:class:`~mechray.api.errors.ApiError` that names the problem.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional

import numpy as np
import torch

from mechray.api.errors import ApiError
from mechray.api.header import check_declared, source

BARE = "upload"
_ZIP, _NPY = b"PK\x03\x04", b"\x93NUMPY"
_PATHLIKE = re.compile(r"[/\\\x00]|\.\.|^[.~]|^[A-Za-z]:")
_FORMATS = ("a torch.save() .pt file, .safetensors, or np.save() .npy / np.savez() .npz")


@dataclass(frozen=True)
class Upload:
    """Parsed upload: content hash, detected format and ``{layer: Tensor[rows, d]}``."""

    sha256: str
    kind: str
    tensors: dict[str, torch.Tensor] = field(compare=False, repr=False)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.tensors.items()}


def check_layer_name(name: Any, what: str = "layer_name") -> str:
    """Return ``name`` if it can be a module name; refuse path-like names (422)."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError(422, "bad_layer_name", f"{what}={name!r} is empty; give a captured layer "
                       "name such as 'mamba_backbone.blocks.3' (GET /interpret/layers lists them)")
    if len(name) > 256 or _PATHLIKE.search(name):
        raise ApiError(422, "path_like_layer_name",
                       f"{what}={name[:80]!r} looks like a file path; layer names are module "
                       "names from model.named_modules() such as 'mamba_backbone.blocks.3' "
                       "(no '/', '\\', '..', or leading '.' or '~')")
    return name


def sniff(data: bytes | BinaryIO) -> Optional[str]:
    """The format the bytes (or a seekable file) are in (``pt``, ``npz``, ``safetensors``,
    ``npy``) or ``None``; reads the first bytes and, for a zip, its directory only."""
    fp, size = source(data)
    first = fp.read(10)
    fp.seek(0)
    if first.startswith(_NPY):
        return "npy"
    if first.startswith(_ZIP):
        try:
            names = zipfile.ZipFile(fp).namelist()
        except (zipfile.BadZipFile, ValueError, OSError):
            return None
        if any(n.endswith("data.pkl") for n in names):
            return "pt"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return None
    if len(first) >= 10:
        (n,) = struct.unpack("<Q", first[:8])
        if 2 <= n <= size - 8 and first[8:9] == b"{":
            return "safetensors"
    return None


def parse_upload(data: bytes | BinaryIO, filename: Optional[str] = None,
                 max_layers: int = 64) -> Upload:
    """Parse uploaded bytes, or a seekable file (read whole only once its headers passed), into
    an :class:`Upload` (see the module docstring); 4xx on failure."""
    name = f"{filename!r}" if filename else "the uploaded file"
    fp, size = source(data)
    if not size:
        raise ApiError(422, "empty_upload", f"{name} is empty; upload {_FORMATS}")
    kind = sniff(fp)
    if kind is None:
        fp.seek(0)
        hint = (" It looks like a raw pickle (or a legacy torch.save file), which mechray never "
                "loads: save tensors with torch.save (zip format), safetensors or numpy."
                if fp.read(1) == b"\x80" else "")
        raise ApiError(415, "unsupported_format",
                       f"{name} is not {_FORMATS} (the format is read from its bytes, not its "
                       f"name).{hint}")
    try:
        check_declared(fp, kind, name, max_layers)       # before any tensor is built
        fp.seek(0)
        whole = fp.read() if not isinstance(data, bytes) else data
        obj = _LOADERS[kind](whole)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(422, "unreadable_upload",
                       f"{name} looks like a {kind} file but cannot be loaded safely: "
                       f"{_reason(exc)}") from None
    tensors = _layers(obj, name, kind)
    if len(tensors) > max_layers:
        raise ApiError(422, "too_many_layers", f"{name} holds {len(tensors)} layers; at most "
                       f"{max_layers} per upload: split it")
    return Upload(hashlib.sha256(whole).hexdigest(), kind, tensors)


# --- loaders (no pickled code runs in any of them) -----------------------------------------------
def _load_pt(data: bytes) -> Any:          # archive and header checked by check_declared
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _load_npy(data: bytes) -> Any:
    return torch.from_numpy(np.array(np.load(io.BytesIO(data), allow_pickle=False)))


def _load_npz(data: bytes) -> Any:          # archive and headers checked by check_declared
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}


def _load_safetensors(data: bytes) -> Any:
    from safetensors.torch import load

    return load(data)


_LOADERS = {"pt": _load_pt, "npy": _load_npy, "npz": _load_npz, "safetensors": _load_safetensors}


def _layers(obj: Any, name: str, kind: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("activations"), dict):
        obj = obj["activations"]                       # a whole mechray shard
    if isinstance(obj, torch.Tensor):
        obj = {BARE: obj}
    if not isinstance(obj, dict) or not obj:
        raise ApiError(422, "bad_upload_content",
                       f"{name} ({kind}) holds {type(obj).__name__}{' (empty)' if not obj else ''}"
                       f"; upload one tensor or a dict {{layer_name: tensor}}")
    out = {}
    for layer, t in obj.items():
        check_layer_name(layer, "uploaded layer name")
        if not isinstance(t, torch.Tensor):
            raise ApiError(422, "bad_upload_content", f"{name}: layer {layer!r} holds "
                           f"{type(t).__name__}, not a tensor; upload {{layer_name: tensor}}")
        if t.is_complex() or t.numel() == 0 or t.dim() == 0:
            raise ApiError(422, "bad_upload_content",
                           f"{name}: layer {layer!r} is {list(t.shape)} {t.dtype}; upload real "
                           "[rows, features] activations with at least one value")
        rows = t.reshape(-1, t.shape[-1])
        out[layer] = (rows if rows.is_floating_point() else rows.to(torch.float32)).contiguous()
    return out


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln),
               lines[0] if lines else type(exc).__name__)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        why += " (only tensors and plain containers load; pickled code never runs)"
    return why[:500]


def parse_params(text: Optional[str]) -> dict[str, Any]:
    """The upload form's ``params`` field: a JSON object, or nothing."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except RecursionError:
        raise ApiError(422, "bad_params", "params nest too deeply to parse; analysis parameters "
                       "are a flat JSON object such as '{\"top_k\": 5}'") from None
    except ValueError as exc:
        raise ApiError(422, "bad_params", f"params is not valid JSON ({exc}); send a JSON object "
                       "such as '{\"top_k\": 5}'") from None
    if not isinstance(value, dict):
        raise ApiError(422, "bad_params", f"params must be a JSON object, got "
                       f"{type(value).__name__}; e.g. '{{\"top_k\": 5}}'")
    return value
