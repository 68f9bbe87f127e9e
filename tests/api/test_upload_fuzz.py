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
