"""The typed records of a store: one shard's manifest entry, one layer's summary.

Usage::

    from mechray.storage.entry import ShardEntry, LayerSummary, entry_problem

    entry_problem({"file": "x"})          # "names 'x', which is not a shard file name ..." or None
    e = ShardEntry.model_validate(raw)    # typed access: e.file, e.layers["popt"].shape, e.steps
    info = LayerSummary(feature_shape=[64], dtype="float32", shards=3, rows=36, steps=[0, 10, 20])
    info.features                         # 64: the product of feature_shape

Entries travel as plain dicts (JSON objects) between the owner, the readers and the analyses;
:class:`ShardEntry` is their schema, checked once where they enter (a manifest read, a page, a
rebuilt shard): strict types (``"3"`` is not an int, ``true`` is not an int), so a hostile or
damaged manifest is a reported problem, never a ``TypeError`` later.  ``steps`` defaults to
``[step]`` here and nowhere else (:func:`steps_of`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from mechray.storage.shard import DIGEST, parse_shard_name

# defer_build: the validators are built at first use, so `mechray ls` (which reads a head and
# no entry) does not pay for them
_STRICT = ConfigDict(strict=True, extra="allow", frozen=True, defer_build=True)


class LayerShape(BaseModel):
    """A layer's tensor in one shard: ``shape`` ``[rows, *feature_shape]`` and ``dtype``."""

    model_config = _STRICT
    shape: list[StrictInt] = Field(min_length=1)
    dtype: StrictStr

    @field_validator("shape")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(d < 0 for d in v):
            raise ValueError("sizes must be >= 0")
        return v


class ShardEntry(BaseModel):
    """One shard as the manifest lists it (see the guide's manifest section)."""

    model_config = _STRICT
    file: StrictStr
    index: StrictInt
    rank: StrictInt
    step: StrictInt
    bytes: StrictInt = Field(ge=0)
    checksum: StrictStr
    layers: dict[StrictStr, LayerShape]
    # optional fields default to None (absent), not to a fresh {} or []: pydantic would copy a
    # mutable default per entry, which doubled the cost of checking a million entries
    world_size: Optional[StrictInt] = None
    steps: Optional[list[StrictInt]] = None
    rows: Optional[dict[StrictStr, StrictInt]] = None
    has_inputs: Optional[StrictBool] = None
    run_id: Optional[StrictStr] = None
    provenance: Optional[list[StrictStr]] = None
    examples: Optional[StrictInt] = None
    dropped_rows: Optional[dict[StrictStr, StrictInt]] = None
    s3_uri: Optional[StrictStr] = None
    pending_upload: Optional[StrictBool] = None
    written_at: Optional[StrictStr] = None

    @field_validator("file")
    @classmethod
    def _name(cls, v: str) -> str:
        if parse_shard_name(v) is None:
            raise ValueError(f"names {v[:120]!r}, which is not a shard file name "
                             f"(activations_[rankNNN_]shard_NNNNNN_step_N.pt, no directories)")
        return v

    @field_validator("checksum")
    @classmethod
    def _digest(cls, v: str) -> str:
        if not DIGEST.fullmatch(v):
            raise ValueError(f"{v[:80]!r} is not 'crc32c:<8 hex digits>' or "
                             f"'sha256:<64 hex digits>'")
        return v

    @field_validator("s3_uri")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith("s3://"):
            raise ValueError(f"{v[:80]!r} is not an s3:// URI")
        return v


def entry_problem(e: Any) -> Optional[str]:
    """What is wrong with one manifest entry (a dict), or ``None`` when it is well formed."""
    if not isinstance(e, dict):
        return f"is {type(e).__name__}, not an object"
    try:
        ShardEntry.model_validate(e)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        name = e.get("file") if isinstance(e.get("file"), str) else "?"
        msg = err["msg"].removeprefix("Value error, ")
        if where == "file":
            return msg
        return f"({str(name)[:120]}) has {where}: {msg} (got {str(err.get('input'))[:40]!r})"
    return None


def steps_of(entry: Mapping[str, Any]) -> list[int]:
    """The steps a shard holds rows of (``steps``, or ``[step]`` for entries without it)."""
    steps = entry.get("steps")
    return list(steps) if steps is not None else [entry["step"]]




class LayerInfo(BaseModel):
    """One captured layer as ``GET /interpret/layers`` serves it."""

    model_config = ConfigDict(strict=True, frozen=True, defer_build=True)
    feature_shape: list[StrictInt]
    dtype: StrictStr
    shards: StrictInt
    rows: StrictInt
    steps: list[StrictInt]

    @property
    def features(self) -> int:
        d = 1
        for s in self.feature_shape:
            d *= s
        return d

    def public(self, max_steps: int = 10_000) -> dict[str, Any]:
        """The served fields, as ``GET /interpret/layers`` answers them: at most ``max_steps``
        steps (a summary is untrusted: it may claim millions), ``steps_total`` counts them."""
        out = {k: getattr(self, k) for k in LayerInfo.model_fields}  # no copies
        out["steps"] = self.steps[:max_steps]
        out["steps_total"] = len(self.steps)
        return out


class LayerSummary(LayerInfo):
    """One captured layer across a store: what ``ShardStore.summaries()`` gives per layer (and,
    as a plain dict without ``max_shard_rows``, ``ShardStore.layers()``)."""

    dropped_rows: StrictInt = 0
    provenance_shards: StrictInt = 0
    max_shard_rows: Optional[StrictInt] = None   # rows of the layer's largest shard (v2 heads)

    def info(self) -> dict[str, Any]:
        """The plain dict ``ShardStore.layers()`` has always given (without ``max_shard_rows``)."""
        out = {k: getattr(self, k) for k in type(self).model_fields if k != "max_shard_rows"}
        out["steps"] = list(self.steps)   # (a head's steps are runs until listed here)
        return out
