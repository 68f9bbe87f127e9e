"""Finishing and mending a store after an outage or a crash: ``mechray sync`` and ``mechray repair``.

Usage::

    from mechray.storage.recovery import sync, repair

    sync("./mechint_cache")      # upload shards left pending by an S3 outage, then the manifest
    report = repair("./mechint_cache")
    # {'adopted': [...], 'salvaged': [...], 'quarantined': [...], 'missing': [...], ...}

Run them when no writer is using the store (the writer owns the manifest while it runs).
``repair`` never deletes a shard's bytes: a file it cannot trust moves to ``.quarantine/``.
It adopts shard files that are complete but unlisted (a writer killed between rename and
manifest update), salvages complete temp files (killed between fsync and rename), drops
entries whose file is gone, and quarantines files that fail their checksum.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from mechray.storage.manifest import MAIN, Manifest, merge, validate
from mechray.storage.shard import (
    checksum,
    decode,
    entry_for,
    file_checksum,
    temp_target,
)
from mechray.storage.sink import StorageTarget, orphans

log = logging.getLogger(__name__)


def _open(path, endpoint_url: Optional[str]) -> tuple[StorageTarget, Manifest, list[Path]]:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; give the storage_path of a capture")
    partials = sorted(root.glob("manifest.rank*.json"))
    docs = [validate(json.loads(p.read_text()), str(p)) for p in [root / MAIN, *partials]
            if p.is_file()]
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
    uploaded, left = owner.sync_pending(budget_s)
    _drop_partials(partials)
    log.info("sync %s: %d uploaded, %d still pending", target.local_dir, uploaded, left)
    return {"uploaded": uploaded, "pending": left, "shards": len(owner.entries())}


def repair(path, endpoint_url: Optional[str] = None) -> dict[str, Any]:
    """Reconcile files and manifest after a crash; returns what was done, file by file."""
    target, owner, partials = _open(path, endpoint_url)
    report: dict[str, Any] = {"adopted": [], "salvaged": [], "quarantined": [], "missing": [],
                              "removed_temp": []}
    quarantine = Path(target.local_dir) / ".quarantine"
    adopted = []
    for file in orphans(target, {e["file"] for e in owner.entries()}):
        final = temp_target(file.name)
        entry = _entry_if_complete(file, final or file.name)
        if entry is None:
            if final:
                file.unlink()
                report["removed_temp"].append(file.name)
            else:
                report["quarantined"].append(_move(file, quarantine))
            continue
        if final:
            if (target.shard_dir / final).exists():  # the rename happened; this is a leftover
                file.unlink()
                report["removed_temp"].append(file.name)
                continue
            os.replace(file, target.shard_dir / final)
            report["salvaged"].append(final)
        else:
            report["adopted"].append(file.name)
        if target.uses_s3:
            entry["pending_upload"] = True
        adopted.append(entry)
    drop = []
    for entry in owner.entries():
        file = target.shard_dir / entry["file"]
        if not file.is_file():
            if not entry.get("s3_uri"):
                drop.append(entry["file"])
                report["missing"].append(entry["file"])
        elif file_checksum(file) != entry["checksum"]:
            drop.append(entry["file"])
            report["quarantined"].append(_move(file, quarantine))
    owner.remove(*drop)
    owner.add(*adopted)
    _drop_partials(partials)
    report["shards"] = len(owner.entries())
    report["pending_upload"] = len(owner.pending())
    log.info("repair %s: %s", target.local_dir, {k: v if isinstance(v, int) else len(v)
                                                 for k, v in report.items()})
    return report


def _entry_if_complete(file: Path, name: str) -> Optional[dict[str, Any]]:
    data = file.read_bytes()
    try:
        payload = decode(data)
        if payload["metadata"]["file"] != name:
            return None
        return entry_for(payload, len(data), checksum(data))
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
