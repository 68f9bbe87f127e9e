"""Reading a store: a directory or ``s3://bucket/prefix``, shard by shard, checksums verified.

Usage::

    from mechray import ShardStore

    store = ShardStore("./mechint_cache")            # or "s3://my-bucket/exp001/activations"
    store.layers()          # {'popt': {'feature_shape': [64], 'dtype': 'float32', 'rows': ..., ...}}
    for entry, rows in store.iter_layer("popt"):     # one shard in memory at a time (mmap)
        ...
    payload = store.load("activations_shard_000000_step_0.pt")

Every read checks the shard's sha256 against the manifest (once per file version per store);
a missing, truncated or altered shard raises an error that names it.  S3 objects are downloaded
once into a local cache (``cache_dir``, default ``$MECHRAY_CACHE_DIR`` or ``~/.cache/mechray``).
Nothing here unpickles code: shards load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from mechray.errors import ShardError
from mechray.storage import s3
from mechray.storage.manifest import MAIN, merge, parse
from mechray.storage.shard import file_checksum, load_error, shard_path

log = logging.getLogger(__name__)
_PARTIAL = re.compile(r"manifest\.rank[0-9]{3,}\.json")



def cache_root(base: Path, bucket: str, prefix: str) -> Path:
    """The local cache directory of ``s3://bucket/prefix``: one plain directory per bucket and
    per prefix under ``base/s3``, whatever characters the prefix holds (``..`` included)."""
    from urllib.parse import quote

    parts = [quote(bucket, safe=""), quote(prefix, safe="") if prefix else "_root"]
    parts = [f"_{p}" if p in (".", "..") or not p else p for p in parts]
    root = base / "s3" / parts[0] / parts[1]
    if not root.resolve().is_relative_to((base / "s3").resolve()):
        raise ValueError(f"s3://{bucket}/{prefix} maps outside the cache {base}: refused")
    return root


class ShardStore:
    """A read-only view of one store's manifest and shards."""

    def __init__(self, location: Union[str, os.PathLike], *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, cache_dir: Optional[str] = None):
        self.location = str(location)
        self.endpoint_url, self.region = endpoint_url, region
        self.is_s3 = self.location.startswith("s3://")
        if self.is_s3:
            self.bucket, self.prefix = s3.parse_uri(self.location)
            base = cache_dir or os.environ.get("MECHRAY_CACHE_DIR") or \
                Path.home() / ".cache" / "mechray"
            self.root = cache_root(Path(base), self.bucket, self.prefix)
        else:
            self.root = Path(self.location).expanduser().resolve()
        self._verified: dict[str, tuple] = {}
        self.refresh()

    # --- the manifest --------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the manifest (and any per-rank partial manifests not merged yet)."""
        docs = [parse(text, where) for where, text in self._manifest_texts()]
        if not docs:
            raise FileNotFoundError(
                f"{self.location} holds no {MAIN}: nothing was captured there yet, or the path is "
                f"wrong. Shards land in MechIntConfig.storage_path (default ./mechint_cache)")
        self.manifest = merge(docs)
        self.entries = {e["file"]: e for e in self.manifest["shards"]}

    def _manifest_texts(self) -> list[tuple[str, str]]:
        if not self.is_s3:
            if not self.root.is_dir():
                return []
            names = [MAIN] + sorted(p.name for p in self.root.iterdir()
                                    if _PARTIAL.fullmatch(p.name))
            return [(str(self.root / n), (self.root / n).read_text()) for n in names
                    if (self.root / n).is_file()]
        client = self._client()
        listed = client.list_objects_v2(Bucket=self.bucket, Prefix=s3.key_for(self.prefix, "manifest"))
        keys = sorted(o["Key"] for o in listed.get("Contents", []))
        main = s3.key_for(self.prefix, MAIN)
        keys = [k for k in keys if k == main] + \
            [k for k in keys if _PARTIAL.fullmatch(k.rsplit("/", 1)[-1]) and
             k.rsplit("/", 1)[0] == main.rsplit("/", 1)[0]]
        return [(f"s3://{self.bucket}/{k}",
                 client.get_object(Bucket=self.bucket, Key=k)["Body"].read().decode()) for k in keys]

    def _client(self):
        return s3.client(self.endpoint_url, self.region)

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    def shards(self, layer: Optional[str] = None) -> list[dict[str, Any]]:
        """Manifest entries (all, or those holding ``layer``), by rank then index."""
        return [e for e in self.manifest["shards"] if layer is None or layer in e["layers"]]

    def layers(self) -> dict[str, dict[str, Any]]:
        """Per layer: feature shape, dtype, shard count, total rows, steps, rows dropped by the
        ``max_activations_per_shard`` cap, and how many shards carry token provenance."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.manifest["shards"]:
            dropped = e.get("dropped_rows") if isinstance(e.get("dropped_rows"), dict) else {}
            prov = e.get("provenance") if isinstance(e.get("provenance"), list) else []
            for name, info in e["layers"].items():
                d = out.setdefault(name, {"feature_shape": info["shape"][1:], "dtype": info["dtype"],
                                          "shards": 0, "rows": 0, "steps": set(),
                                          "dropped_rows": 0, "provenance_shards": 0})
                d["shards"] += 1
                d["rows"] += info["shape"][0]
                d["steps"].update(e.get("steps", [e["step"]]))
                d["dropped_rows"] += int(dropped.get(name, 0) or 0)
                d["provenance_shards"] += name in prov
        for d in out.values():
            d["steps"] = sorted(d["steps"])
        return out

    def steps(self) -> list[int]:
        return sorted({s for e in self.manifest["shards"] for s in e.get("steps", [e["step"]])})

    def check_layer(self, layer: str) -> None:
        """Raise ``KeyError`` naming the valid layers when ``layer`` was not captured here."""
        known = self.layers()
        if layer not in known:
            import difflib

            close = difflib.get_close_matches(layer, list(known), n=3)
            raise KeyError(f"layer {layer!r} is not in {self.location}"
                           f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                           f"captured layers: {sorted(known)}")

    # --- shards --------------------------------------------------------------------------------
    def path(self, shard: Union[str, dict[str, Any]]) -> Path:
        """A verified local path for a shard (downloaded into the cache when it lives on S3)."""
        entry = self._entry(shard)
        local = shard_path(self.root, entry["file"])
        if not local.is_file() and not self.is_s3:
            spool = shard_path(self.root / ".spool", entry["file"])
            local = spool if spool.is_file() else local
        if not local.is_file():
            if not entry.get("s3_uri") and not self.is_s3:
                raise ShardError(f"shard {entry['file']} is listed in the manifest but missing "
                                 f"from {self.root}; restore it, or run `mechray ls` to see what "
                                 f"is there")
            self._download(entry, local)
        self._verify(entry, local)
        return local

    def load(self, shard: Union[str, dict[str, Any]], mmap: bool = True) -> dict[str, Any]:
        """The shard's payload (``activations``, ``metadata``, maybe ``inputs``), memory-mapped."""
        entry = self._entry(shard)
        path = self.path(entry)
        try:
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
        except Exception as exc:  # a verified file that still fails to load is a format problem
            raise ShardError(f"shard {entry['file']} ({path}) could not be loaded: "
                             f"{load_error(exc)}") from None

    def iter_layer(self, layer: str, steps: Optional[list[int]] = None
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Yield ``(entry, rows)`` per shard holding ``layer``; only that shard is mapped."""
        self.check_layer(layer)
        for entry in self.shards(layer):
            if steps is not None and not set(entry.get("steps", [entry["step"]])) & set(steps):
                continue
            yield entry, self.load(entry)["activations"][layer]

    def read_layer(self, layer: str, max_rows: Optional[int] = None) -> torch.Tensor:
        """All (or the first ``max_rows``) rows of a layer as one tensor; for small stores."""
        parts, total = [], 0
        for _, rows in self.iter_layer(layer):
            parts.append(rows[: None if max_rows is None else max_rows - total].clone())
            total += len(parts[-1])
            if max_rows is not None and total >= max_rows:
                break
        return torch.cat(parts)

    def _entry(self, shard: Union[str, dict[str, Any]]) -> dict[str, Any]:
        if isinstance(shard, dict):
            return shard
        name = os.path.basename(str(shard))
        if name not in self.entries:
            raise ShardError(f"shard {name!r} is not listed in the manifest of {self.location}; "
                             f"`mechray ls {self.location}` lists the shards")
        return self.entries[name]

    def _download(self, entry: dict[str, Any], local: Path) -> None:
        bucket, key = s3.parse_uri(entry["s3_uri"]) if entry.get("s3_uri") else \
            (self.bucket, s3.key_for(self.prefix, entry["file"]))
        if key.rsplit("/", 1)[-1] != entry["file"]:
            raise ShardError(f"the manifest of {self.location} gives shard {entry['file']} the "
                             f"S3 object {key!r}, which has another name: refused")
        local.parent.mkdir(parents=True, exist_ok=True)
        if local.parent.resolve() != self.root.resolve():  # contained, after resolving links
            raise ShardError(f"shard {entry['file']} would be downloaded to {local.parent}, "
                             f"outside the cache {self.root}: refused")
        fd, name = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
        os.close(fd)
        tmp = Path(name)  # unique: concurrent readers of one shard never share a temp file
        try:
            self._client().download_file(bucket, key, str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise ShardError(f"shard {entry['file']} could not be downloaded from "
                             f"s3://{bucket}/{key}: {exc}") from exc
        os.replace(tmp, local)

    def _verify(self, entry: dict[str, Any], path: Path) -> None:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns, entry["checksum"])
        if self._verified.get(str(path)) == stamp:
            return
        if st.st_size != entry["bytes"]:
            raise ShardError(f"shard {entry['file']} ({path}) is {st.st_size} bytes but the "
                             f"manifest says {entry['bytes']}: it is truncated or was replaced")
        if file_checksum(path) != entry["checksum"]:
            raise ShardError(f"shard {entry['file']} ({path}) does not match its checksum "
                             f"{entry['checksum']}: the file is corrupt")
        self._verified[str(path)] = stamp
