"""Finishing and mending a store after an outage or a crash: ``mechray sync`` and ``mechray repair``.

Usage::

    from mechray.storage.recovery import sync, repair

    sync("./mechint_cache")      # upload shards left pending by an S3 outage, then the manifest
    report = repair("./mechint_cache")
    # {'adopted': [...], 'salvaged': [...], 'quarantined': [...], 'missing': [...], ...}
    report = repair("./mechint_cache", rebuild=True)   # manifest.json damaged: rebuilt from shards

Both claim the store while they run (``StoreBusyError`` if a writing run holds it): the writer
owns the manifest while it runs.  Neither reads or moves a file outside the store: every name
goes through :func:`mechray.shard.shard_path`.
``repair`` never deletes a shard's bytes: a file it cannot trust moves to ``.quarantine/``.
It adopts shard files that are complete but unlisted (a writer killed between rename and
manifest update), salvages complete temp files (killed between fsync and rename), drops
entries whose file is gone, and quarantines files that fail their checksum.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from mechray.errors import ShardError
from mechray.storage.claim import StoreClaim
from mechray.storage.manifest import FORMAT, MAIN, Manifest, merge, read
from mechray.storage.shard import (
    UnsafeNameError,
    checksum,
    decode,
    entry_for,
    file_checksum,
    shard_path,
    temp_target,
)
from mechray.storage.sink import StorageTarget, orphans

log = logging.getLogger(__name__)


_TEMP_MANIFEST = re.compile(r"\.manifest(\.rank[0-9]{3,})?\.json\..+\.tmp")


@contextmanager
def _claimed(target: StorageTarget, what: str) -> Iterator[None]:
    """Hold the store's claim while ``what`` runs (refused while a writing run holds it)."""
    claim = StoreClaim(StorageTarget(backend="local", local_dir=target.local_dir),
                       f"mechray-{what}-{os.getpid()}")
    claim.acquire()
    try:
        yield
    finally:
        claim.release()


def _root(path) -> Path:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; give the storage_path of a capture")
    return root


def _open(path, endpoint_url: Optional[str]) -> tuple[StorageTarget, Manifest, list[Path]]:
    root = _root(path)
    partials = sorted(root.glob("manifest.rank*.json"))
    docs = [read(p) for p in [root / MAIN, *partials] if p.is_file()]
    config = merge(docs)["config"] if docs else {}
    target = StorageTarget.from_manifest(root, config, endpoint_url)
    owner = Manifest(target, config or None)
    for doc in docs[1:] if (root / MAIN).is_file() else docs:
        owner.add(*doc["shards"])
    return target, owner, partials


def sync(path, endpoint_url: Optional[str] = None, budget_s: Optional[float] = None) -> dict:
    """Upload every shard the manifest marks ``pending_upload``; returns counts."""
    target, owner, partials = _open(path, endpoint_url)
    if not target.uses_s3:
        raise ValueError(f"{target.local_dir} was captured with storage_backend='local'; there is "
                         f"nothing to upload (use 'both' or 's3' to upload)")
    with _claimed(target, "sync"):
        uploaded, left = owner.sync_pending(budget_s)
        _drop_partials(partials)
    log.info("sync %s: %d uploaded, %d still pending", target.local_dir, uploaded, left)
    return {"uploaded": uploaded, "pending": left, "shards": len(owner.entries())}


def repair(path, endpoint_url: Optional[str] = None, rebuild: bool = False) -> dict[str, Any]:
    """Reconcile files and manifest after a crash; returns what was done, file by file.

    ``rebuild=True`` sets the manifest (and any per-rank partial manifests) aside as
    ``*.damaged-<time>`` and makes a new one from the shard files: every shard carries its own
    entry (checksums are recomputed).
    """
    root = _root(path)
    if rebuild:
        config = _salvage_config((root / MAIN).read_bytes()) if (root / MAIN).is_file() else {}
        if config.get("storage_backend") == "s3":
            raise ShardError(
                f"{root} was captured with storage_backend='s3': its shards live in "
                f"s3://{config.get('s3_bucket')}/{config.get('s3_prefix')}, not here, so a "
                f"manifest rebuilt from this directory would drop them. If the S3 copy of "
                f"manifest.json is intact, copy it here; otherwise download the shards into "
                f"{root} and run the rebuild again")
        with _claimed(StorageTarget(backend="local", local_dir=str(root)), "repair"):
            kept = _set_aside(root)
        report = repair(root, endpoint_url)
        report["set_aside"] = kept
        return report
    target, owner, partials = _open(root, endpoint_url)
    with _claimed(target, "repair"):
        return _repair(target, owner, partials)


def _set_aside(root: Path) -> list[str]:
    """Move manifest.json and partial manifests to ``NAME.damaged-<time>``; keep their config."""
    stamp, kept = time.strftime("%Y%m%dT%H%M%S", time.gmtime()), []
    config: dict[str, Any] = {}
    for p in [root / MAIN, *sorted(root.glob("manifest.rank*.json"))]:
        if not p.is_file():
            continue
        config = config or _salvage_config(p.read_bytes())
        dest = p.with_name(f"{p.name}.damaged-{stamp}")
        os.replace(p, dest)
        kept.append(dest.name)
        log.warning("set %s aside as %s; rebuilding from the shards", p.name, dest.name)
    if config:  # the new manifest keeps how the store was written (backend, bucket, prefix)
        doc = {"format": FORMAT, "version": 1, "config": config, "shards": []}
        (root / MAIN).write_text(json.dumps(doc))
    return kept


def _salvage_config(data: bytes) -> dict[str, Any]:
    """The ``config`` object of a damaged manifest, when its head is still readable."""
    text = data.decode("utf-8", "replace")
    m = re.search(r'"config"\s*:\s*', text)
    if m is None:
        return {}
    try:
        value, _ = json.JSONDecoder().raw_decode(text, m.end())
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _repair(target: StorageTarget, owner: Manifest, partials: list[Path]) -> dict[str, Any]:
    report: dict[str, Any] = {"adopted": [], "salvaged": [], "quarantined": [], "missing": [],
                              "removed_temp": []}
    quarantine = Path(target.local_dir) / ".quarantine"
    adopted = []
    for file in orphans(target, {e["file"] for e in owner.entries()}):
        final = temp_target(file.name)
        entry = _entry_if_complete(file, final or file.name, target.checksum)
        if entry is None:
            if final:
                file.unlink()
                report["removed_temp"].append(file.name)
            else:
                report["quarantined"].append(_move(file, quarantine))
            continue
        if final:
            if shard_path(target.shard_dir, final).exists():  # renamed already: a leftover
                file.unlink()
                report["removed_temp"].append(file.name)
                continue
            os.replace(file, shard_path(target.shard_dir, final))
            report["salvaged"].append(final)
        else:
            report["adopted"].append(file.name)
        if target.uses_s3:
            entry["pending_upload"] = True
        adopted.append(entry)
    drop = []
    for entry in owner.entries():
        try:
            file = shard_path(target.shard_dir, entry["file"])
        except UnsafeNameError as exc:  # e.g. a link out of the store: forget the entry
            log.warning("%s", exc)
            drop.append(entry["file"])
            report["missing"].append(entry["file"])
            continue
        if not file.is_file():
            if not entry.get("s3_uri"):
                drop.append(entry["file"])
                report["missing"].append(entry["file"])
        elif file_checksum(file, entry["checksum"]) != entry["checksum"]:
            drop.append(entry["file"])
            report["quarantined"].append(_move(file, quarantine))
    owner.remove(*drop)
    owner.add(*adopted)
    _drop_partials(partials)
    for p in Path(target.local_dir).iterdir():  # a killed run's half-written manifest
        if _TEMP_MANIFEST.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            report["removed_temp"].append(p.name)
    report["shards"] = len(owner.entries())
    report["pending_upload"] = len(owner.pending())
    log.info("repair %s: %s", target.local_dir, {k: v if isinstance(v, int) else len(v)
                                                 for k, v in report.items()})
    return report


def _entry_if_complete(file: Path, name: str, target_checksum: str = "crc32c"
                       ) -> Optional[dict[str, Any]]:
    data = file.read_bytes()
    try:
        payload = decode(data)
        if payload["metadata"]["file"] != name:
            return None
        return entry_for(payload, len(data), checksum(data, target_checksum))
    except Exception as exc:  # a partial or foreign file is not adopted
        log.warning("%s is not a complete shard (%s)", file,
                    (str(exc).splitlines() or [type(exc).__name__])[0][:200])
        return None


def _move(file: Path, folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    os.replace(file, folder / file.name)
    log.warning("quarantined %s -> %s", file.name, folder)
    return file.name


def _drop_partials(partials: list[Path]) -> None:
    for p in partials:
        p.unlink(missing_ok=True)
