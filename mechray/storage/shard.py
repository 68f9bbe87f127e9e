"""A shard: the unit of work and of failure.  Names, the in-memory form, the file format.

Usage::

    from mechray.storage.shard import shard_name, parse_shard_name, save, decode

    shard_name(index=3, step=600)                    # 'activations_shard_000003_step_600.pt'
    shard_name(index=3, step=600, rank=1, world_size=2)
                                                     # 'activations_rank001_shard_000003_step_600.pt'
    nbytes, digest = save(payload, open_file)        # streamed, 'crc32c:...'; torch.load reads it
    payload = decode(data)                           # never runs pickled code

A shard file holds ``{'activations': {layer: Tensor[rows, d]}, 'metadata': {...}}`` and, when
inputs are captured, ``'inputs'``: a ``Tensor[batch, ...]`` (positional inputs) or a dict of
keyword tensors (``input_ids``, ``attention_mask``, ...; sequences of different lengths are
right-padded with 0, which the mask marks as padding).  Metadata says the step(s), the rank, and
for every layer ``row_steps[layer][i]`` (the step row ``i`` came from) and
``row_positions[layer][i]`` (its index among the rows that forward call produced, after the
mask).  For token models (a mask was given, see :mod:`mechray.capture.tokens`), ``'examples'`` is an
int32 ``[E, T]`` table of the token ids of every example in the shard (``-1``: padding), with
``metadata['example_steps']``, and ``'provenance'[layer]`` holds int32 ``example`` (row of that
table), ``position`` (in the sequence, ``-1`` for per-example rows) and ``token`` (id) per row.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import crc32c as _crc32c

from mechray.errors import ShardBuildError, ShardError
from mechray.storage.files import UnsafeFileError, open_regular

if TYPE_CHECKING:
    import numpy as np
    import torch
else:  # torch loads at first use: `mechray ls` and `sync` read manifests without it
    from mechray.storage.lazy import torch

FORMAT = "mechray.shard/1"
_NAME = re.compile(r"activations_(?:rank(?P<rank>[0-9]{3,})_)?shard_(?P<index>[0-9]{6,})"
                   r"_step_(?P<step>-?[0-9]+)\.pt")
MAX_NAME = 255  # one path component on every file system we write to


class UnsafeNameError(ShardError, ValueError):
    """A store named a file that is not a plain shard file name (a path, ``..``, a link out)."""


def shard_name(index: int, step: int, rank: int = 0, world_size: int = 1) -> str:
    """Deterministic file name: the seed's form for one process, rank-qualified for several."""
    if world_size > 1:
        return f"activations_rank{rank:03d}_shard_{index:06d}_step_{step}.pt"
    return f"activations_shard_{index:06d}_step_{step}.pt"


def parse_shard_name(name: object) -> Optional[dict[str, int]]:
    """``{'rank', 'index', 'step'}`` for a shard file name, ``None`` for anything else."""
    m = _NAME.fullmatch(name) if isinstance(name, str) and len(name) <= MAX_NAME else None
    if not m:
        return None
    return {"rank": int(m["rank"] or 0), "index": int(m["index"]), "step": int(m["step"])}


def shard_path(root, name: Any, where: str = "the manifest") -> Path:
    """The one way a stored name becomes a location: ``root / name`` for a plain shard file name.

    Usage::

        path = shard_path(store_root, entry["file"])     # UnsafeNameError for anything else

    ``name`` must match the documented pattern (``activations_[rankNNN_]shard_NNNNNN_step_N.pt``:
    no separators, no ``..``, not absolute).  A symlink at that place whose target leaves
    ``root`` is refused too, so nothing a store says reads or writes outside it.
    """
    if parse_shard_name(name) is None:
        raise UnsafeNameError(
            f"{where} names {str(name)[:120]!r}, which is not a shard file name "
            f"(activations_[rankNNN_]shard_NNNNNN_step_N.pt, no directories): refused. If the "
            f"store is yours, `mechray repair --rebuild` rebuilds its manifest from the shards")
    base = Path(root)
    path = base / name
    if path.is_symlink():
        real, home = path.resolve(), base.resolve()
        if not real.is_relative_to(home):
            raise UnsafeNameError(f"{where}: shard {name} is a symlink to {real}, outside the "
                                  f"store {home}: refused. Replace the link by the file itself")
    return path


MAX_PICKLE = 64 << 20  # a shard's data.pkl holds metadata only (tensors are separate records)


def check_container(fh, size: int, name: str) -> None:
    """Check a shard file's zip directory before anything is loaded from it: every record stored
    (uncompressed, so it cannot inflate past what it declares), inside the file, and the
    pickle small.  Reads only the zip directory; ``UnsafeFileError`` naming the problem."""
    def bad(why: str) -> UnsafeFileError:
        return UnsafeFileError(f"{name} is not a mechray shard: {why}; refused")
    try:
        with zipfile.ZipFile(fh) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise bad(f"its zip directory is unreadable ({exc})") from None
    if not infos or not any(i.filename.endswith("/data.pkl") for i in infos):
        raise bad("it holds no data.pkl record")
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise bad(f"record {i.filename[:80]!r} is compressed (mechray writes shards "
                      f"uncompressed; a compressed record could inflate past its size)")
        if i.file_size != i.compress_size or i.header_offset + i.compress_size > size:
            raise bad(f"record {i.filename[:80]!r} declares {i.file_size} bytes, more than "
                      f"the file holds")
        if i.filename.endswith("/data.pkl") and i.file_size > MAX_PICKLE:
            raise bad(f"its data.pkl declares {i.file_size} bytes (metadata stays under "
                      f"{MAX_PICKLE})")


def load_regular(path, name: str, algorithm: str) -> tuple[dict[str, Any], int, str]:
    """``(payload, bytes, checksum)`` of a shard file a store holds, read as untrusted data: a
    regular file only (:func:`open_regular`), its zip directory checked
    (:func:`check_container`) before loading, tensors memory-mapped (never read whole), loaded
    with ``weights_only=True``."""
    fd = open_regular(path, "shard")
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        check_container(fh, size, name)
        fh.seek(0)
        h, left = Hasher(algorithm), size
        buf = memoryview(bytearray(1 << 20))
        while left and (n := fh.readinto(buf[:min(len(buf), left)])):
            h.update(buf[:n])
            left -= n
        proc = f"/proc/self/fd/{fd}"   # the descriptor checked above, not the name again
        source = proc if os.path.exists(proc) else path
        payload = torch.load(source, weights_only=True, mmap=True, map_location="cpu")
    return payload, size, h.digest()


ALGORITHMS = ("crc32c", "sha256")
DIGEST = re.compile(r"crc32c:[0-9a-f]{8}|sha256:[0-9a-f]{64}")


class Hasher:
    """A running checksum of one algorithm: ``update`` with bytes, ``digest()`` as
    ``'crc32c:<8 hex>'`` or ``'sha256:<64 hex>'`` (the manifest's ``checksum``).

    CRC32C (Castagnoli, hardware-accelerated by the ``crc32c`` package, ~5 GB/s here) is the
    default: it catches every burst error up to 32 bits and any flipped bit, which is what a
    shard store needs (torn writes, bad disks, bad copies).  ``sha256`` (~0.8 GB/s) is kept for
    stores that want a cryptographic digest, and for reading stores written before.
    """

    def __init__(self, algorithm: str = "crc32c"):
        algorithm = algorithm.split(":", 1)[0]   # a digest names its algorithm too
        if algorithm not in ALGORITHMS:
            raise ShardError(f"unknown checksum algorithm {algorithm!r}; mechray knows "
                             f"{', '.join(ALGORITHMS)} (set MechIntConfig(checksum=...))")
        self.algorithm = algorithm
        self._crc = 0
        self._sha = hashlib.sha256() if algorithm == "sha256" else None

    def update(self, data) -> None:
        if self._sha is not None:
            self._sha.update(data)
        else:
            self._crc = _crc32c.crc32c(data, self._crc)

    def digest(self) -> str:
        if self._sha is not None:
            return "sha256:" + self._sha.hexdigest()
        return f"crc32c:{self._crc:08x}"


def checksum(data: bytes | memoryview, algorithm: str = "crc32c") -> str:
    """The checksum of some bytes, ``'crc32c:...'`` (default) or ``'sha256:...'``."""
    h = Hasher(algorithm)
    h.update(data)
    return h.digest()


def file_checksum(path, algorithm: str = "sha256") -> str:
    """The checksum of a file's bytes, read into one reused 1 MiB buffer (a fresh 8 MiB
    ``read()`` per piece cost 4,000 page faults per 20 MB shard: 13 ms against 3 ms).
    ``algorithm`` is ``'crc32c'``, ``'sha256'``, or a manifest digest (its prefix names the
    algorithm), so ``file_checksum(path, entry['checksum']) == entry['checksum']`` checks a shard
    of any store, old (sha256) or new (crc32c)."""
    h = Hasher(algorithm)
    buf = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(buf[:n])
    return h.digest()


def corrupt_error(entry: dict[str, Any], path, store: Any = None) -> ShardError:
    """The error for a shard whose bytes do not match its manifest checksum."""
    where = store if store is not None else Path(path).parent
    return ShardError(f"shard {entry['file']} ({path}) does not match its checksum "
                      f"{entry['checksum']}: the file is corrupt. `mechray repair {where}` "
                      f"quarantines it and fixes the manifest; recapture that step if you need it")


@dataclass
class Chunk:
    """Rows one forward call produced for one layer (host tensor, maybe still being copied)."""

    rows: torch.Tensor
    step: int                        # -1: not known at capture; the shard's step is used
    positions: Optional[torch.Tensor]  # None: rows are 0..n-1 of that call's output
    start: int = 0                   # first kept position when positions is None
    event: Any = None                # torch.cuda.Event of the device->host copy, or None
    example: Optional[torch.Tensor] = None   # int32 provenance (token models), or None
    position: Optional[torch.Tensor] = None
    token: Optional[torch.Tensor] = None

    def ready(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.rows


@dataclass
class PendingShard:
    """A shard handed off by the training thread; ``materialize`` runs on a writer thread."""

    name: str
    index: int
    step: int
    rank: int
    world_size: int
    max_rows: int
    chunks: dict[str, list[Chunk]]
    layer_info: dict[str, dict[str, Any]]
    inputs: list[Any] = field(default_factory=list)       # tensors, or dicts of tensors
    examples: list[torch.Tensor] = field(default_factory=list)   # [B, T] int32 id tables
    example_steps: list[int] = field(default_factory=list)
    run_id: Optional[str] = None

    def materialize(self) -> dict[str, Any]:
        """Wait for device copies, join chunks, keep the newest ``max_rows`` rows per layer."""
        try:
            return self._materialize()
        except Exception as exc:
            raise ShardBuildError(f"shard {self.name} could not be assembled from the captured "
                                  f"rows: {exc}") from exc

    def _materialize(self) -> dict[str, Any]:
        acts, row_steps, row_pos, layers, prov = {}, {}, {}, {}, {}
        for layer, chunks in self.chunks.items():
            widths = {tuple(c.rows.shape[1:]) for c in chunks}
            if len(widths) > 1:
                raise ValueError(f"layer {layer!r} produced rows of different feature shapes "
                                 f"{sorted(widths)} in one shard; capture a layer whose last "
                                 f"dimension is fixed, or pick the tensor with output_keys")
            rows = torch.cat([c.ready() for c in chunks]) if len(chunks) > 1 else chunks[0].ready()
            steps = torch.cat([torch.full((len(c.rows),), c.step if c.step >= 0 else self.step,
                                          dtype=torch.int64) for c in chunks])
            pos = torch.cat([c.positions if c.positions is not None else
                             torch.arange(c.start, c.start + len(c.rows), dtype=torch.int64)
                             for c in chunks])
            extra = len(rows) - self.max_rows
            if extra > 0:
                rows, steps, pos = rows[extra:], steps[extra:], pos[extra:]
            acts[layer] = rows.contiguous()
            row_steps[layer], row_pos[layer] = steps, pos
            if any(c.example is not None for c in chunks):
                prov[layer] = {key: torch.cat([_companion(c, key) for c in chunks])[max(extra, 0):]
                               for key in ("example", "position", "token")}
            info = dict(self.layer_info.get(layer, {}))
            info["dropped_rows"] = int(info.get("dropped_rows", 0)) + max(extra, 0)
            layers[layer] = {**info, "rows": len(rows), "shape": list(rows.shape),
                             "dtype": str(rows.dtype).removeprefix("torch.")}
        steps_all = sorted({int(s) for t in row_steps.values() for s in t.unique().tolist()}
                           or {self.step})
        payload: dict[str, Any] = {
            "activations": acts,
            "metadata": {
                "format": FORMAT, "file": self.name, "shard_index": self.index, "step": self.step,
                "steps": steps_all, "rank": self.rank, "world_size": self.world_size,
                "created": time.time(), "layers": layers, "run_id": self.run_id,
                "row_steps": row_steps, "row_positions": row_pos,
            },
        }
        if self.inputs:
            payload["inputs"] = join_inputs(self.inputs)
        if prov:
            width = max(t.shape[1] for t in self.examples)
            payload["examples"] = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]),
                                                                     value=-1)
                                             for t in self.examples])
            payload["metadata"]["example_steps"] = torch.tensor(
                [s if s >= 0 else self.step for t, s in zip(self.examples, self.example_steps)
                 for _ in range(len(t))], dtype=torch.int64)
            payload["provenance"] = prov
        return payload


def _companion(chunk: Chunk, key: str) -> torch.Tensor:
    value = getattr(chunk, key)
    return value if value is not None else torch.full((len(chunk.rows),), -1, dtype=torch.int32)


def join_inputs(parts: list[Any]) -> Any:
    """Model inputs of several forward calls as one: positional tensors concatenated, keyword
    dicts concatenated per key with sequences right-padded with 0 to the longest."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if not all(isinstance(p, dict) for p in parts) or \
            len({tuple(sorted(p)) for p in parts}) != 1:
        raise ValueError("the model was called with different kinds of inputs within one shard "
                         f"({[sorted(p) if isinstance(p, dict) else 'tensor' for p in parts]}); "
                         "call it the same way for every batch, or set save_inputs=False")
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if len({v.shape[2:] for v in values}) != 1 or any(v.dim() < 1 for v in values):
            raise ValueError(f"input {key!r} has shapes {[list(v.shape) for v in values]} in one "
                             "shard; only the sequence dimension (dim 1) may vary")
        width = max(v.shape[1] if v.dim() > 1 else 0 for v in values)
        out[key] = torch.cat([torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) +
                                                      (0, width - v.shape[1]))
                              if v.dim() > 1 else v for v in values])
    return out


class _HashingWriter:
    """A file-like sink that checksums and counts the bytes on their way to the real file."""

    def __init__(self, fh, algorithm: str = "crc32c"):
        self.fh, self.hasher, self.nbytes = fh, Hasher(algorithm), 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        self.hasher.update(data)
        self.nbytes += len(data)
        try:
            return self.fh.write(data)
        except OSError as exc:  # torch wraps it in a RuntimeError; keep the errno (ENOSPC...)
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(payload: dict[str, Any], sink, zip_crc32: bool) -> None:
    """``torch.save`` into a write()-only sink; without ``zip_crc32`` the zip records' own CRC-32
    fields are left 0 (torch.load does not check them) instead of costing a second pass over
    every byte at ~1.6 GB/s.  The per-call writer keeps torch's global setting untouched."""
    ser = torch.serialization
    if zip_crc32 or not hasattr(ser, "_save"):
        torch.save(payload, sink)
        return
    try:
        writer = torch._C.PyTorchFileWriter(sink, False, ser._get_storage_alignment())
    except (AttributeError, TypeError):  # another torch: its own save, zip CRCs included
        torch.save(payload, sink)
        return
    ser._save(payload, writer, pickle, ser.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    sink.flush()


def save(payload: dict[str, Any], fh, algorithm: str = "crc32c") -> tuple[int, str]:
    """Stream a payload as ``.pt`` bytes into an open binary file; returns ``(bytes, checksum)``.

    One pass: no in-memory copy of the file (tensor storages go from their memory to the file),
    the checksum is computed as the bytes go out.  With ``crc32c`` (the default) the zip
    container's per-record CRC-32 fields are not computed (they read as 0; ``torch.load`` does
    not check them, ``unzip -t`` does): the manifest's CRC32C covers every byte of the file
    instead.  ``sha256`` writes the classic zip CRC-32 fields as well.
    """
    sink = _HashingWriter(fh, algorithm)
    try:
        _torch_save(payload, sink, zip_crc32=sink.hasher.algorithm == "sha256")
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise
    return sink.nbytes, sink.hasher.digest()


def encode(payload: dict[str, Any], algorithm: str = "crc32c") -> tuple[bytes, str]:
    """Serialise a payload to the bytes of a ``.pt`` file and their checksum."""
    buf = io.BytesIO()
    _, digest = save(payload, buf, algorithm)
    return buf.getvalue(), digest


def decode(data: bytes) -> dict[str, Any]:
    """Load shard bytes with ``weights_only=True``: tensors and plain containers, no code."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def load_error(exc: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused or failed."""
    lines = str(exc).splitlines()
    reason = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(exc).__name__)
    return (f"{reason.strip()} (mechray loads shards with weights_only=True and never runs "
            f"pickled code)")


def entry_for(payload: dict[str, Any], nbytes: int, digest: str) -> dict[str, Any]:
    """The manifest entry describing a shard."""
    meta = payload["metadata"]
    return {
        "file": meta["file"], "index": meta["shard_index"], "rank": meta["rank"],
        "world_size": meta["world_size"], "step": meta["step"], "steps": meta["steps"],
        "rows": {k: v["rows"] for k, v in meta["layers"].items()},
        "layers": {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in meta["layers"].items()},
        "has_inputs": "inputs" in payload, "run_id": meta.get("run_id"),
        "provenance": sorted(payload.get("provenance", {})),
        "examples": int(len(payload["examples"])) if "examples" in payload else 0,
        "dropped_rows": {k: int(v.get("dropped_rows", 0)) for k, v in meta["layers"].items()
                         if v.get("dropped_rows")},
        "bytes": nbytes, "checksum": digest, "s3_uri": None,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- zero-copy wire form for Ray's object store (numpy buffers travel without pickling) ------------

def to_wire(payload: dict[str, Any]) -> dict[str, Any]:
    """Replace every tensor by ``(uint8 ndarray, dtype, shape)`` so Ray stores it zero-copy."""
    return _map_tensors(payload, lambda t: ("__tensor__", _raw(t), str(t.dtype), list(t.shape)))


def from_wire(wire: dict[str, Any]) -> dict[str, Any]:
    def back(v):
        if isinstance(v, tuple) and len(v) == 4 and v[0] == "__tensor__":
            _, raw, dtype, shape = v
            with warnings.catch_warnings():  # object-store buffers are read-only; we only read
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.from_numpy(raw)
            return flat.view(getattr(torch, dtype.removeprefix("torch."))).reshape(shape)
        if isinstance(v, dict):
            return {k: back(x) for k, x in v.items()}
        if isinstance(v, list):
            return [back(x) for x in v]
        return v
    return back(wire)


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _map_tensors(v: Any, fn) -> Any:
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, dict):
        return {k: _map_tensors(x, fn) for k, x in v.items()}
    if isinstance(v, list):
        return [_map_tensors(x, fn) for x in v]
    return v


def temp_target(name: str) -> Optional[str]:
    """The shard name a temp file was being written for (``.NAME.xxxx.tmp``), else ``None``."""
    if name.startswith(".activations_") and name.endswith(".tmp"):
        final = name[1:].rsplit(".", 2)[0]
        return final if parse_shard_name(final) else None
    return None
