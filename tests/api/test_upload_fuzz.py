"""Fuzzed uploads: random bytes, truncated archives, lying headers, zip bombs, code-running
pickles -> a 4xx ApiError naming the problem, nothing executed, never another exception."""

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechray.api.errors import ApiError
from mechray.api.uploads import parse_upload


def _pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"popt": torch.randn(16, 8)}, buf)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, popt=np.random.rand(16, 8).astype(np.float32))
    return buf.getvalue()


def _safetensors() -> bytes:
    from safetensors.torch import save

    return save({"popt": torch.randn(16, 8)})


VALID = {"pt": _pt(), "npz": _npz(), "safetensors": _safetensors()}


def _outcome(blob: bytes) -> str:
    try:
        up = parse_upload(blob, filename="fuzz.bin")
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc
        assert str(exc)
        return "refused"
    assert up.tensors and all(t.dim() == 2 for t in up.tensors.values())
    return "accepted"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(blob):
    _outcome(blob)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncated_and_bit_flipped_valid_files(kind, data):
    blob = bytearray(VALID[kind])
    cut = data.draw(st.integers(0, len(blob)))
    flips = data.draw(st.lists(st.integers(0, max(len(blob) - 1, 0)), max_size=4))
    for i in flips:
        if i < len(blob):
            blob[i] ^= 0xFF
    _outcome(bytes(blob[:cut]))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_safetensors_headers_that_lie_about_their_size(n, rest):
    _outcome(struct.pack("<Q", n) + b"{" + rest)


def test_zip_bombs_are_refused_before_inflating():
    buf = io.BytesIO()
    np.savez_compressed(buf, popt=np.zeros((20000, 1000), dtype=np.float32))  # 80 MB -> ~80 KB
    with pytest.raises(ApiError) as info:
        parse_upload(buf.getvalue(), filename="bomb.npz")
    assert info.value.status == 422 and "inflates" in str(info.value)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x00" * (50 << 20))
    with pytest.raises(ApiError) as info:
        parse_upload(bomb.getvalue(), filename="bomb.pt")
    assert info.value.status == 422 and "compressed" in str(info.value)


class _Run:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MECHRAY_UPLOAD_MARK']}",))


@pytest.mark.parametrize("how", ["raw-pickle", "torch-save", "legacy-torch-save", "npy-object"])
def test_code_running_pickles_execute_nothing(tmp_path, monkeypatch, how):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MECHRAY_UPLOAD_MARK", str(marker))
    buf = io.BytesIO()
    if how == "raw-pickle":
        pickle.dump({"popt": _Run()}, buf)
    elif how == "torch-save":
        torch.save({"popt": _Run()}, buf)
    elif how == "legacy-torch-save":
        torch.save({"popt": _Run()}, buf, _use_new_zipfile_serialization=False)
    else:
        np.save(buf, np.array([_Run()], dtype=object), allow_pickle=True)
    with pytest.raises(ApiError) as info:
        parse_upload(buf.getvalue(), filename="evil.pt")
    assert 400 <= info.value.status < 500
    assert not marker.exists()


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64,
           torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_header_checks_agree_with_what_torch_loads(data):
    """Random dtypes, shapes and views (slices, transposes, broadcasts), saved as torch.save
    and safetensors: refused (422) exactly when the dtype is unsupported or a view repeats
    values; otherwise accepted with the very values that were saved."""
    dtype = data.draw(st.sampled_from(_DTYPES))
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    base = (torch.rand(shape) * 10).to(dtype)
    view = data.draw(st.sampled_from(["same", "slice", "transpose", "expand"]))
    if view == "slice":
        t = base[..., ::2]
    elif view == "transpose":
        t = base.transpose(0, -1)
    elif view == "expand":
        t = base.reshape(-1)[:1].expand(3, *shape)
    else:
        t = base
    unsupported = dtype in (torch.float8_e4m3fn, torch.complex64)
    repeats = view == "expand"
    fmt = data.draw(st.sampled_from(["pt", "safetensors"]))
    if fmt == "safetensors":
        from safetensors.torch import save

        if repeats or dtype == torch.complex64:          # safetensors stores dense values only
            return
        blob = save({"a": t.contiguous()})
    else:
        buf = io.BytesIO()
        torch.save({"a": t}, buf)
        blob = buf.getvalue()
    try:
        up = parse_upload(blob, filename=f"x.{fmt}")
    except ApiError as exc:
        assert exc.status == 422, exc
        assert unsupported or repeats, (dtype, view, fmt, exc)
        assert exc.code == ("unsupported_dtype" if unsupported else "expanded_upload"), exc
        return
    assert not (unsupported or repeats), (dtype, view, fmt)
    expect = t.reshape(-1, t.shape[-1])
    got = up.tensors["a"]
    assert got.shape == expect.shape
    assert torch.equal(got, expect if expect.is_floating_point() else expect.to(torch.float32))
