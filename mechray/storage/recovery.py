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
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from mechray.errors import ShardError
from mechray.storage import manifest_format as mf
from mechray.storage.claim import StoreClaim
from mechray.storage.entry import entry_problem
from mechray.storage.files import UnsafeFileError, open_regular
from mechray.storage.manifest import Manifest
from mechray.storage.manifest_format import MAIN, merge
from mechray.storage.shard import (
    UnsafeNameError,
    file_checksum,
    load_regular,
    shard_path,
    temp_target,
)
from mechray.storage.sink import orphans
from mechray.storage.target import StorageTarget

log = logging.getLogger(__name__)


_TEMP_MANIFEST = re.compile(r"\.manifest(\.rank[0-9]{3,})?\.(json|journal)\..+\.tmp")
MAX_CONFIG_SCAN = 64 << 20  # a damaged manifest's config is looked for in its first 64 MiB


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
    partials = mf.partial_manifests(root)
    docs = [mf.load(root, p.name) for p in [root / MAIN, *partials] if mf.exists(root, p.name)]
    config = merge(docs)["config"] if docs else {}
    target = StorageTarget.from_manifest(root, config, endpoint_url)
    owner = Manifest(target, config or None)
    for doc in docs[1:] if mf.exists(root) else docs:
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
        config = _salvage_config(root / MAIN)
        if config.get("storage_backend") == "s3":
            raise ShardError(
                f"{root} was captured with storage_backend='s3': its shards live in "
                f"s3://{config.get('s3_bucket')}/{config.get('s3_prefix')}, not here, so a "
                f"manifest rebuilt from this directory would drop them. If the S3 copy of "
                f"manifest.json is intact, copy it here; otherwise download the shards into "
                f"{root} and run the rebuild again")
        target = StorageTarget(backend="local", local_dir=str(root))
        with _claimed(target, "repair"):
            return _rebuild(root, config)
    target, owner, partials = _open(root, endpoint_url)
    with _claimed(target, "repair"):
        _quarantine_dir(root, create=False)   # refused before anything moves
        report = _repair(target, owner, partials)
        owner.close()                         # the journal folded in: format 2, compacted
        return report


def _rebuild(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A new manifest from the shard files alone, built completely before the old one (and
    any partial manifests and journals) is set aside and replaced in one rename."""
    report: dict[str, Any] = {"adopted": [], "salvaged": [], "quarantined": [], "missing": [],
                              "removed_temp": []}
    _quarantine_dir(root, create=False)
    target = StorageTarget(backend="local", local_dir=str(root))
    entries = []
    for file in orphans(target, set()):
        final = temp_target(file.name)
        if final and os.path.lexists(root / final):   # renamed already: a leftover
            file.unlink()
            report["removed_temp"].append(file.name)
            continue
        entry = _entry_if_complete(file, final or file.name, config.get("checksum", "crc32c"))
        if entry is None:
            _discard(file, final, root, report)
            continue
        if final:
            os.replace(file, shard_path(root, final))
            report["salvaged"].append(final)
        else:
            report["adopted"].append(file.name)
        if config.get("storage_backend") == "both":   # not known to be on S3: `mechray sync`
            entry["pending_upload"] = True
        entries.append(entry)
    stamp, kept = time.strftime("%Y%m%dT%H%M%S", time.gmtime()), []
    old = [root / MAIN, root / mf.journal_name(MAIN)] + \
        [q for p in mf.partial_manifests(root) for q in (p, root / mf.journal_name(p.name))]
    for p in old:   # hard links: the old files stay in place until the new one replaces them
        if os.path.lexists(p):
            dest = p.with_name(f"{p.name}.damaged-{stamp}")
            os.link(p, dest, follow_symlinks=False)
            kept.append(dest.name)
            log.warning("set %s aside as %s; rebuilding from the shards", p.name, dest.name)
    mf.write_new(root, config, entries)
    for p in old[2:]:
        p.unlink(missing_ok=True)
    report["set_aside"] = kept
    report["shards"] = len(entries)
    report["pending_upload"] = sum(bool(e.get("pending_upload")) for e in entries)
    log.info("repair --rebuild %s: %d shards", root, len(entries))
    return report


def _salvage_config(path: Path) -> dict[str, Any]:
    """The ``config`` object of a (maybe damaged) manifest, when its head is still readable;
    ``{}`` for anything else (a link, a FIFO, a device, unreadable text)."""
    try:
        fd = open_regular(path, "manifest")
    except (OSError, UnsafeFileError):
        return {}
    with os.fdopen(fd, "rb") as fh:
        size = min(os.fstat(fd).st_size, MAX_CONFIG_SCAN)  # read(n) would allocate n at once
        text = fh.read(size).decode("utf-8", "replace")
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
    root = Path(target.local_dir)
    adopted = []
    for file in orphans(target, {e["file"] for e in owner.entries()}):
        final = temp_target(file.name)
        entry = _entry_if_complete(file, final or file.name, target.checksum)
        if entry is None:
            _discard(file, final, root, report)
            continue
        if final:
            if os.path.lexists(shard_path(target.shard_dir, final)):  # renamed already
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
        if not os.path.lexists(file):
            if not entry.get("s3_uri"):
                drop.append(entry["file"])
                report["missing"].append(entry["file"])
        elif not _matches(file, entry["checksum"]):
            drop.append(entry["file"])
            report["quarantined"].append(_move(file, root))
    owner.remove(*drop)
    owner.add(*adopted)
    _drop_partials(partials)
    for p in root.iterdir():  # a killed run's half-written manifest
        if _TEMP_MANIFEST.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            report["removed_temp"].append(p.name)
    report["shards"] = len(owner.entries())
    report["pending_upload"] = len(owner.pending())
    log.info("repair %s: %s", target.local_dir, {k: v if isinstance(v, int) else len(v)
                                                 for k, v in report.items()})
    return report


def _matches(file: Path, digest: str) -> bool:
    """Whether a listed shard is a regular file (no link, FIFO, device) with its checksum."""
    try:
        fd = open_regular(file, "shard")
    except (OSError, UnsafeFileError) as exc:
        log.warning("%s", exc)
        return False
    os.close(fd)
    return file_checksum(file, digest) == digest


def _entry_if_complete(file: Path, name: str, target_checksum: str = "crc32c"
                       ) -> Optional[dict[str, Any]]:
    """The manifest entry of a shard file, or ``None`` (logged why) for anything that is not a
    complete, well-formed shard: read as untrusted data (:func:`shard.load_regular`), its
    metadata's types checked before they are used."""
    try:
        payload, nbytes, digest = load_regular(file, name, target_checksum)
        meta = payload.get("metadata") if isinstance(payload, dict) else None
        if not isinstance(meta, dict) or meta.get("file") != name:
            raise ValueError(f"its metadata does not name it {name}")
        entry = _entry_for(payload, meta, nbytes, digest)
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"its metadata {problem}")
        return entry
    except Exception as exc:  # a partial, foreign or hostile file is not adopted
        log.warning("%s is not a complete shard (%s)", file,
                    (str(exc).splitlines() or [type(exc).__name__])[0][:200])
        return None


def _entry_for(payload: dict[str, Any], meta: dict[str, Any], nbytes: int, digest: str
               ) -> dict[str, Any]:
    from mechray.storage.shard import entry_for

    layers = meta.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError("its metadata 'layers' is not {layer: {...}}")
    for key in ("shard_index", "rank", "step", "world_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise ValueError(f"its metadata {key}={str(meta.get(key))[:40]!r} is not an integer")
    return entry_for(payload, nbytes, digest)


def _discard(file: Path, final: Optional[str], root: Path, report: dict[str, Any]) -> None:
    """An incomplete temp file goes; anything else named like a shard moves to quarantine."""
    if final:
        file.unlink()
        report["removed_temp"].append(file.name)
    else:
        report["quarantined"].append(_move(file, root))


def _quarantine_dir(root: Path, create: bool = True) -> Optional[int]:
    """A descriptor of ``root/.quarantine``, a real directory inside the store (made if
    ``create``); a link or anything else there is refused before any file moves."""
    q = Path(root) / ".quarantine"
    if create:
        try:
            os.mkdir(q, 0o755)
        except FileExistsError:
            pass
    elif not os.path.lexists(q):
        return None
    st = os.lstat(q)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeFileError(f"{q} is {kind}: "
                              f"mechray quarantines files only into a real directory inside the "
                              f"store, never through a link. Remove it and run repair again")
    fd = os.open(q, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    if create:
        return fd
    os.close(fd)
    return None


def _move(file: Path, root: Path) -> str:
    """Move a store file into ``.quarantine/`` by descriptors (nothing outside is touched);
    an older file of the same name there is kept (the new one gets a suffix)."""
    qfd = _quarantine_dir(root)
    assert qfd is not None
    src = os.open(file.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dest = file.name
        try:
            os.lstat(dest, dir_fd=qfd)
            dest = f"{file.name}.{time.time_ns()}"
        except FileNotFoundError:
            pass
        os.rename(file.name, dest, src_dir_fd=src, dst_dir_fd=qfd)
    finally:
        os.close(src)
        os.close(qfd)
    log.warning("quarantined %s -> %s", file.name, Path(root) / ".quarantine" / dest)
    return file.name


def _drop_partials(partials: list[Path]) -> None:
    for p in partials:
        p.unlink(missing_ok=True)
        p.with_name(mf.journal_name(p.name)).unlink(missing_ok=True)
