"""Property-based tests: config, manifest, shard names and shard bytes from a hostile world."""

import io
import json
import os
import tempfile
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechray import ConfigError, MechIntConfig, ShardError, ShardStore
from mechray.storage.manifest import validate
from mechray.storage.shard import checksum, decode, parse_shard_name, shard_name

FIELDS = list(MechIntConfig.model_fields)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=6))
def test_config_accepts_or_rejects_with_a_config_error(data):
    """Any dict either builds a valid config or raises ConfigError; nothing else escapes."""
    try:
        config = MechIntConfig.from_dict(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid MechIntConfig:")
    else:
        assert config.sample_layers and config.max_activations_per_shard >= 1
        assert MechIntConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_manifest_validation_accepts_only_manifests(doc):
    try:
        validate(doc, "fuzzed.json")
    except ValueError as exc:
        assert "fuzzed.json" in str(exc)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10**7), st.integers(0, 10**9), st.integers(0, 999), st.integers(1, 999))
def test_shard_names_round_trip(index, step, rank, world):
    rank = rank % world
    parsed = parse_shard_name(shard_name(index, step, rank, world))
    assert parsed == {"rank": rank if world > 1 else 0, "index": index, "step": step}


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_parse_shard_name_never_raises(name):
    parsed = parse_shard_name(name)
    if parsed is not None:
        assert name.endswith(".pt") and "/" not in name


def _zip_with(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _valid_shard_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"activations": {"x": torch.arange(512.0).reshape(64, 8)}, "metadata": {"step": 1}},
               buf)
    return buf.getvalue()


_GARBAGE_MARK = os.path.join(tempfile.mkdtemp(prefix="mechray-fuzz-"), "ran")


class _TouchesMark:
    def __reduce__(self):
        return (os.system, (f"touch {_GARBAGE_MARK}",))


def _evil_shard_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"activations": {"x": torch.zeros(2, 2)}, "metadata": {"x": _TouchesMark()}}, buf)
    return buf.getvalue()


def _plain(value, depth: int = 0) -> bool:
    """Only tensors and plain containers (what ``weights_only`` may build)."""
    if depth > 50:
        return False
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes,
                                               torch.dtype, torch.device, torch.Size))


def _flip(data: bytes, at: int, byte: int) -> bytes:
    return data if not data else data[:at % len(data)] + bytes([byte]) + data[at % len(data) + 1:]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2000),
                 st.builds(lambda b: _zip_with({"archive/data.pkl": b}), st.binary(max_size=500)),
                 st.builds(lambda cut: _valid_shard_bytes()[:cut], st.integers(0, 3000)),
                 st.builds(lambda cut: _evil_shard_bytes()[:cut], st.integers(0, 3000)),
                 st.builds(_flip, st.builds(_evil_shard_bytes), st.integers(0, 3000),
                           st.integers(0, 255))))
def test_decode_fails_cleanly_on_garbage(blob):
    """Random bytes, fake zips, truncated shards and damaged shards whose pickle would run code:
    each either decodes to tensors and plain containers or raises an ``Exception``; no pickled
    code ever runs (the marker the evil pickle would touch never appears)."""
    try:
        payload = decode(blob)
    except Exception:
        payload = None
    assert not os.path.exists(_GARBAGE_MARK), "a pickle in the bytes ran code"
    if payload is not None:
        assert isinstance(payload, dict) and _plain(payload), type(payload)


def test_decode_fuzz_inputs_include_the_valid_and_the_evil_shard():
    """The strategies above reach both ends: a whole valid shard decodes, a whole evil one is
    refused without running."""
    assert torch.equal(decode(_valid_shard_bytes())["activations"]["x"],
                       torch.arange(512.0).reshape(64, 8))
    with pytest.raises(Exception, match="weights_only|GLOBAL"):
        decode(_evil_shard_bytes())
    assert not os.path.exists(_GARBAGE_MARK)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MECHRAY_FUZZ_MARK']}",))


@pytest.mark.parametrize("mutation", ["pickle-in-metadata", "pickle-as-tensor"])
def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch, mutation):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MECHRAY_FUZZ_MARK", str(marker))
    buf = io.BytesIO()
    evil = {"activations": {"x": torch.zeros(2, 2)}, "metadata": {"x": _RunsCode()}} \
        if mutation == "pickle-in-metadata" else {"activations": {"x": _RunsCode()}}
    torch.save(evil, buf)
    with pytest.raises(Exception, match="[Ww]eights.only"):
        decode(buf.getvalue())
    # and through a store whose manifest vouches for the bytes
    (tmp_path / "activations_shard_000000_step_0.pt").write_bytes(buf.getvalue())
    entry = {"file": "activations_shard_000000_step_0.pt", "index": 0, "rank": 0, "step": 0,
             "steps": [0], "rows": {"x": 2}, "layers": {"x": {"shape": [2, 2], "dtype": "float32"}},
             "bytes": len(buf.getvalue()), "checksum": checksum(buf.getvalue())}
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "mechray.manifest", "version": 1, "config": {}, "shards": [entry]}))
    with pytest.raises(ShardError, match="weights_only"):
        ShardStore(tmp_path).load(entry["file"])
    assert not marker.exists()
