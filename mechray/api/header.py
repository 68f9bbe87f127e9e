"""What an upload declares, read from its header before any tensor is built.

Usage::

    from mechray.api.header import check_declared

    check_declared(data, "pt", "'acts.pt'", max_layers=64)   # raises a 4xx ApiError, or returns

A file's header says how many tensors it holds, their dtypes, layouts, shapes and strides and how
many bytes each one's storage carries: a ``torch.save`` archive in its pickle (read here by an
unpickler that knows only tensor headers, storages, dtypes and plain containers, so nothing runs
and no tensor is built), ``.npy`` / ``.npz`` in each array's header, ``.safetensors`` in its JSON
header.  Refused before any memory is spent on them:

- a ``.pt`` archive with compressed entries (``torch.save`` never compresses) or an ``.npz``
  that inflates to more than :data:`NPZ_EXPANSION` times its size (``unsafe_upload``),
- more than ``max_layers`` layers (``too_many_layers``; counted while reading, so 240,000 tiny
  layers stop at the first ``max_layers + 1``),
- a dtype other than :data:`SUPPORTED_DTYPES` (float8, complex, quantized, strings, objects:
  ``unsupported_dtype``), a layout other than dense (sparse, quantized, nested:
  ``unsupported_layout``),
- a view with more values than its storage carries (``torch.zeros(1).expand(10**5, 10**4)``:
  ``expanded_upload``), layers that together, made dense and float, would take more than
  :data:`DENSE_FACTOR` times the upload's bytes (views sharing one storage), or a storage whose
  declared size differs from the bytes in the file,
- a ``.pt`` pickle that calls anything but the checked globals, or calls one with other argument
  types (``bytearray(10**9)``, ``set(n)``: ``unreadable_upload``), uses an opcode a tensor file
  never needs (``BYTEARRAY8``, ``NEWOBJ``, ``BUILD``, buffers, extensions), runs more than
  :data:`MAX_PICKLE_OPS` opcodes, or is over :data:`MAX_PICKLE_BYTES`.  It is read by Python's
  own unpickler (its memo a dict: CPython's C unpickler grows an array to a memo index read from
  the stream, 1 GiB for a 10-byte pickle), so no number in the stream sizes an allocation,
- a ``.safetensors`` header over :data:`MAX_SAFETENSORS_HEADER` or past the file's end.

Given a seekable file, only its headers are read; the whole file is read once they pass.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional

import numpy as np
import torch

from mechray.api.errors import ApiError

SUPPORTED_DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32",
                    "int64", "uint8", "uint16", "uint32", "uint64", "bool")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                       "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                       "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
                       "BOOL": "bool"}
DENSE_FACTOR = 4             # accepted layers, dense and float, take at most 4x the upload
NPZ_EXPANSION = 4            # an .npz may inflate to at most this many times its size
MAX_SAFETENSORS_HEADER = 4 * 2 ** 20   # ~100 bytes a tensor: 40,000 tensors
_EXTRA_TENSORS = 64          # a whole shard also holds inputs and the like beside its layers


@dataclass(frozen=True, slots=True)
class Declared:
    """One tensor as its file declares it (nothing of it is built)."""

    dtype: str                      # torch/numpy name ('float32') or the format's ('F8_E4M3')
    shape: tuple[int, ...]
    stored: int                     # values the bytes behind it hold
    layout: str = "dense"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_bytes(self) -> int:
        """Bytes once contiguous; integer and bool values become float32."""
        floating = self.dtype.startswith(("float", "bfloat"))
        return self.numel * (_itemsize(self.dtype) if floating else 4)


def check_declared(data: bytes | BinaryIO, kind: str, name: str, max_layers: int) -> None:
    """Refuse (4xx) an upload whose header declares too many layers, an unsupported dtype or
    layout, or more values than it carries; see the module docstring.  ``data`` may be a
    seekable file: only its headers are read (a refused upload is never read whole)."""
    limit = max_layers + _EXTRA_TENSORS
    fp, size = source(data)
    tree = _READERS[kind](fp, size, limit)
    if isinstance(tree, dict) and isinstance(tree.get("activations"), dict):
        tree = tree["activations"]                    # a whole mechray shard
    layers = {"upload": tree} if isinstance(tree, Declared) else \
        tree if isinstance(tree, dict) else {}
    if len(layers) > max_layers:
        raise ApiError(422, "too_many_layers", f"{name} holds {len(layers)} layers; at most "
                       f"{max_layers} per upload: split it")
    dense = 0
    for layer, t in layers.items():
        if isinstance(t, Declared):
            _check(t, f"{name}: layer {str(layer)[:80]!r}")
            dense += t.dense_bytes
    if dense > DENSE_FACTOR * size + 2 ** 20:
        raise ApiError(422, "expanded_upload",
                       f"{name}'s layers would take {dense / 2 ** 20:,.0f} MiB once made dense "
                       f"and float, from a {size / 2 ** 20:,.1f} MiB upload: they share "
                       "their storage (views of one tensor); upload each layer's own values "
                       "(.clone() them before saving)")


def source(data: bytes | BinaryIO) -> tuple[BinaryIO, int]:
    """``(file positioned at 0, size)`` for bytes or a seekable file."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data), len(data)
    size = data.seek(0, io.SEEK_END)
    data.seek(0)
    return data, size


def _check(t: Declared, where: str) -> None:
    if t.layout != "dense":
        raise ApiError(422, "unsupported_layout",
                       f"{where} is a {t.layout} tensor; uploads hold dense tensors: convert it "
                       "with .to_dense() (sparse) or .dequantize() (quantized) first")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ApiError(422, "unsupported_dtype",
                       f"{where} has dtype {t.dtype}, which the API does not analyse; supported "
                       f"dtypes: {', '.join(SUPPORTED_DTYPES)} (convert it, e.g. "
                       ".to(torch.float32), before uploading)")
    if any(not isinstance(s, int) or s < 0 for s in t.shape):
        raise ApiError(422, "bad_upload_content", f"{where} declares the shape {list(t.shape)}")
    if t.numel > t.stored:
        raise ApiError(422, "expanded_upload",
                       f"{where} is a {list(t.shape)} view of {t.stored:,} stored values (an "
                       "expanded or broadcast tensor): made dense it would take "
                       f"{t.numel * 4 / 2 ** 20:,.0f} MiB from a {t.stored:,}-value upload; "
                       "upload the values themselves (.contiguous().clone() of the rows you "
                       "mean)")


# --- .pt (torch.save): a pickle read by an unpickler that builds nothing --------------------------
MAX_PICKLE_BYTES = 4 * 2 ** 20   # data.pkl of a tensor file holds headers: ~150 bytes a tensor
MAX_PICKLE_OPS = 200_000         # opcodes run at most (each builds at most one small object)


class _Storage:
    __slots__ = ("dtype", "nbytes")                      # no __dict__: BUILD cannot change it

    def __init__(self, dtype: Optional[str], nbytes: int):
        self.dtype, self.nbytes = dtype, nbytes


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: Optional[torch.dtype]):
        self.dtype = dtype                               # None: UntypedStorage (sizes in bytes)


class _Unsupported:
    """A tensor rebuilt by anything but the dense rebuild functions (sparse, quantized...)."""

    __slots__ = ("layout",)

    def __init__(self, layout: str):
        self.layout = layout

    def __call__(self, *args: Any, **kwargs: Any) -> Declared:
        return Declared("?", (0,), 0, layout=self.layout)


_LAYOUTS = {"_rebuild_sparse_tensor": "sparse", "_rebuild_sparse_csr_tensor": "sparse",
            "_rebuild_qtensor": "quantized", "_rebuild_nested_tensor": "nested",
            "_rebuild_wrapper_subclass": "tensor-subclass",
            "_rebuild_meta_tensor_no_storage": "meta",
            "_rebuild_device_tensor_from_numpy": "device",
            "_rebuild_device_tensor_from_cpu_tensor": "device", "_rebuild_xla_tensor": "xla"}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what}; a tensor file's pickle holds only tensor headers, "
                                  "storages, dtypes and plain containers")


def _ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(type(x) is int for x in value)


# Each global the pickle may call, with its arguments checked before the call: nothing is built
# from a number in the stream (bytearray(10**9), a memo index, a frame or buffer size).
def _ordered_dict(*args: Any) -> OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise _refuse(f"OrderedDict{_show(args)}")
    return OrderedDict(*args)


def _collection(kind: type) -> Any:
    def build(*args: Any) -> Any:
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
            raise _refuse(f"{kind.__name__}{_show(args)}: only a list of items")
        return kind(*args)
    return build


def _bytearray(*args: Any) -> bytearray:
    """``bytearray(b'...')`` or ``bytearray('...', 'latin-1')`` (as pickle writes one), never
    ``bytearray(n)``, which would allocate n bytes from a number in the stream."""
    if len(args) == 1 and isinstance(args[0], bytes) or \
            len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
        return bytearray(*args)
    raise _refuse(f"bytearray{_show(args)}: a bytearray is rebuilt from its bytes only, never "
                  "allocated from a size in the stream")


def _size(*args: Any) -> tuple:
    if len(args) == 1 and _ints(args[0]):
        return tuple(args[0])
    raise _refuse(f"torch.Size{_show(args)}")


def _device(*args: Any) -> str:
    if 1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) <= 64 and \
            (len(args) == 1 or type(args[1]) is int):
        return args[0]
    raise _refuse(f"torch.device{_show(args)}")


def _layout(*args: Any) -> str:
    if len(args) == 1 and isinstance(args[0], str) and len(args[0]) <= 64:
        return args[0]
    raise _refuse(f"torch.serialization._get_layout{_show(args)}")


def _parameter(data: Any = None, requires_grad: Any = False, hooks: Any = None, *rest: Any
               ) -> Declared:
    if not isinstance(data, Declared) or not isinstance(requires_grad, bool) or \
            not (hooks is None or isinstance(hooks, dict)) or len(rest) > 1:
        raise _refuse("torch._utils._rebuild_parameter with arguments other than a tensor, "
                      "a bool and its hooks")
    return data


def _latin1(*args: Any) -> bytes:
    if len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
        return args[0].encode("latin1")
    raise pickle.UnpicklingError("_codecs.encode with anything but latin1 text")


def _show(args: tuple) -> str:
    return "(" + ", ".join(type(a).__name__ for a in args)[:80] + ")"


_REFUSED_OPS = {
    pickle.BYTEARRAY8: "a bytearray of a size given in the stream",
    pickle.NEXT_BUFFER: "an out-of-band buffer", pickle.READONLY_BUFFER: "an out-of-band buffer",
    pickle.INST: "an instance of a class", pickle.OBJ: "an instance of a class",
    pickle.NEWOBJ: "an instance of a class", pickle.NEWOBJ_EX: "an instance of a class",
    pickle.BUILD: "an object's state", pickle.PERSID: "a text persistent id",
    pickle.EXT1: "a copyreg extension", pickle.EXT2: "a copyreg extension",
    pickle.EXT4: "a copyreg extension",
}


def _dispatch() -> dict[int, Any]:
    """Python's own unpickler's opcodes (its memo is a dict: no index allocates, unlike the C
    one's array), each counted, and the ones a tensor file never needs refused."""
    table: dict[int, Any] = {}
    for op, fn in pickle._Unpickler.dispatch.items():
        def counted(self: "_HeaderUnpickler", fn: Any = fn) -> None:
            self.ops += 1
            if self.ops > MAX_PICKLE_OPS:
                raise _refuse(f"more than {MAX_PICKLE_OPS:,} pickle operations")
            fn(self)
        table[op] = counted
    for code, what in _REFUSED_OPS.items():
        def refused(self: "_HeaderUnpickler", what: str = what, code: bytes = code) -> None:
            raise _refuse(f"opcode {code!r} builds {what}")
        table[code[0]] = refused
    return table


class _HeaderUnpickler(pickle._Unpickler):
    """Reads ``data.pkl`` into plain containers with :class:`Declared` leaves.  Python's own
    unpickler (its memo a dict), its opcodes counted and those that build instances, state or
    buffers refused; the globals it may call are the checked ones above, so no pickled code
    runs and nothing is allocated from a number in the stream."""

    dispatch = _dispatch()

    def __init__(self, data: bytes, records: dict[str, int], prefix: str, limit: int):
        super().__init__(io.BytesIO(data))
        self.records, self.prefix, self.limit, self.tensors, self.ops = \
            records, prefix, limit, 0, 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "builtins" and name in ("set", "frozenset", "bytearray"):
            return {"set": _collection(set), "frozenset": _collection(frozenset),
                    "bytearray": _bytearray}[name]
        if module == "_codecs" and name == "encode":
            return _latin1
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
                return self._tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _parameter
            if name in _LAYOUTS:
                return _Unsupported(_LAYOUTS[name])
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch":
            value = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name.endswith("Storage"):
                    cls = getattr(torch, name, None)
                    dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
                    if isinstance(dtype, torch.dtype):
                        return _StorageType(dtype)
                elif name == "Size":
                    return _size
                elif name == "device":
                    return _device
                else:
                    value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.qscheme)):
                return value
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not a "
                                     "tensor, storage or plain container")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[3], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        kind, key, numel = pid[1], pid[2], pid[4]
        nbytes = numel if kind.dtype is None else numel * kind.dtype.itemsize
        record = self.records.get(f"{self.prefix}data/{key}")
        if record is None or record != nbytes:
            raise pickle.UnpicklingError(
                f"storage {key[:40]!r} declares {nbytes:,} bytes but the archive holds "
                f"{'none' if record is None else f'{record:,}'}")
        return _Storage(None if kind.dtype is None else _dtype_name(kind.dtype), nbytes)

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any = None, *rest: Any
                ) -> Declared:
        self.tensors += 1
        if self.tensors > self.limit:
            raise _TooMany(self.limit)
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor without a storage")
        if type(offset) is not int or offset < 0 or not _ints(size) or \
                not (stride is None or _ints(stride)) or len(rest) > 4 or \
                (rest and not isinstance(rest[0], bool)) or \
                (len(rest) > 1 and not (rest[1] is None or isinstance(rest[1], dict))):
            raise _refuse(f"torch._utils._rebuild_tensor{_show((storage, offset, size, stride))}")
        dtype = storage.dtype
        if dtype is None:                                  # _rebuild_tensor_v3: dtype argument
            given = rest[2] if len(rest) >= 3 else None
            if not isinstance(given, torch.dtype):
                raise pickle.UnpicklingError("an untyped storage without a dtype")
            dtype = _dtype_name(given)
        itemsize = _itemsize(dtype)
        shape = tuple(size)
        if not all(s >= 0 for s in shape):
            raise pickle.UnpicklingError(f"a tensor of shape {str(shape)[:80]}")
        stored = storage.nbytes // itemsize if itemsize else 0
        if stride is not None and math.prod(shape) > 0:
            strides = tuple(stride)
            if len(strides) != len(shape) or not all(s >= 0 for s in strides):
                raise pickle.UnpicklingError(f"a tensor with strides {str(strides)[:80]}")
            end = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
            if end > stored:
                raise pickle.UnpicklingError(f"a {list(shape)} view reaching value {end:,} of a "
                                             f"storage of {stored:,}")
        return Declared(dtype, shape, stored)


class _TooMany(Exception):
    def __init__(self, limit: int):
        self.limit = limit


def _itemsize(dtype: str) -> int:
    value = getattr(torch, dtype, None)
    return value.itemsize if isinstance(value, torch.dtype) else 1


def _read_pt(fp: BinaryIO, size: int, limit: int) -> Any:
    archive = zipfile.ZipFile(fp)
    infos = archive.infolist()
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed or sum(i.file_size for i in infos) > size:
        raise ApiError(422, "unsafe_upload", "the .pt archive holds compressed entries "
                       f"{packed[:3]}; torch.save never compresses, so it was not written by "
                       "torch.save: re-save it with torch.save(tensors, path)")
    pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise ApiError(422, "unsafe_upload", f"the .pt archive's data.pkl is "
                       f"{pkl.file_size / 2 ** 20:,.1f} MiB, over {MAX_PICKLE_BYTES // 2 ** 20} "
                       "MiB: a tensor file's pickle holds only tensor headers (~150 bytes each); "
                       "save tensors (a dict {layer: tensor}), not Python objects, or upload "
                       ".safetensors")
    prefix = pkl.filename[: -len("data.pkl")]
    records = {i.filename: i.file_size for i in infos}
    with archive.open(pkl) as entry:
        entry._expected_crc = None  # type: ignore[attr-defined]  # CRC-32 fields may be 0: torch.load
        header = entry.read()    # skips them, and mechray shards (checksum='crc32c') leave them 0
    try:
        return _HeaderUnpickler(header, records, prefix, limit).load()
    except _TooMany as exc:
        raise ApiError(422, "too_many_layers", f"the upload holds more than {exc.limit} tensors; "
                       f"at most {exc.limit - _EXTRA_TENSORS} layers per upload: split it"
                       ) from None


# --- numpy and safetensors: their headers are data ------------------------------------------------
def _npy_declared(fp: Any, payload: int) -> Declared:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy format version {version} (np.save writes 1.0 or 2.0)")
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    name = dtype.name if dtype.kind in "biuf" and dtype.name in SUPPORTED_DTYPES else \
        f"{dtype.name} ({dtype.str})"
    return Declared(name, tuple(shape), (payload - fp.tell()) // max(dtype.itemsize, 1))


def _read_npy(fp: BinaryIO, size: int, limit: int) -> Any:
    return _npy_declared(fp, size)


def _read_npz(fp: BinaryIO, size: int, limit: int) -> Any:
    archive = zipfile.ZipFile(fp)
    infos = archive.infolist()
    if sum(i.file_size for i in infos) > NPZ_EXPANSION * size:
        raise ApiError(422, "unsafe_upload", f"the .npz inflates to more than {NPZ_EXPANSION}x "
                       "its size; upload it uncompressed (np.savez, not np.savez_compressed)")
    if len(infos) > limit:
        raise ApiError(422, "too_many_layers", f"the upload holds {len(infos)} arrays; at most "
                       f"{limit - _EXTRA_TENSORS} layers per upload: split it")
    out = {}
    for info in infos:
        with archive.open(info) as entry:
            out[info.filename.removesuffix(".npy")] = _npy_declared(entry, info.file_size)
    return out


def _read_safetensors(fp: BinaryIO, size: int, limit: int) -> Any:
    (n,) = struct.unpack("<Q", fp.read(8))
    if n > min(MAX_SAFETENSORS_HEADER, size - 8):
        raise ApiError(422, "unsafe_upload", f"the .safetensors header declares {n:,} bytes, "
                       f"over {MAX_SAFETENSORS_HEADER // 2 ** 20} MiB or past the file's "
                       f"{size:,} bytes; save it with safetensors.torch.save_file")
    header = json.loads(fp.read(n))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for layer, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"the header entry of {str(layer)[:80]!r} is not an object")
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(x, int) for x in shape + offsets)):
            raise ValueError(f"the header entry of {str(layer)[:80]!r} has no shape/offsets")
        name = _SAFETENSORS_DTYPES.get(str(dtype), str(dtype)[:32])
        size = _itemsize(name) if name in SUPPORTED_DTYPES else 1
        out[layer] = Declared(name, tuple(shape), max(offsets[1] - offsets[0], 0) // size)
    if len(out) > limit:
        raise ApiError(422, "too_many_layers", f"the upload holds {len(out)} tensors; at most "
                       f"{limit - _EXTRA_TENSORS} layers per upload: split it")
    return out


_READERS = {"pt": _read_pt, "npy": _read_npy, "npz": _read_npz, "safetensors": _read_safetensors}
