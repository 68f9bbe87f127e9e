"""The manifest's format: ``manifest.json`` and ``manifest.journal``, rendered and read here only.

Usage::

    from mechray.storage.manifest_format import load, read_head, write_new

    doc = load(store_root)          # {'format', 'version', 'config', 'summary', 'shards': [...]}
    head = read_head(store_root)    # Head(config, layers, shards, bytes, ...) without any entry
    write_new(store_root, config, entries)    # a whole new manifest.json and a fresh journal

Their one writer is the owner that holds a store's entries and commits them,
:class:`mechray.storage.manifest.Manifest` (with the bytes made here), or :func:`write_new` for
``mechray repair``; every reader (local, S3, the API's store view) reads through this module.

Format version 2 is two files (version 1, ``manifest.json`` alone, still reads):

- ``manifest.json``: a JSON document, the readable index of every shard: one head key per line
  (``format``, ``version``, ``created``, ``updated``, ``config``, ``summary``), then
  ``"shards": [`` and one entry per line.  Rewritten whole (atomically) only when the journal
  is folded in: on ``close()``, by ``mechray repair``, while the store is small
  (< :data:`mechray.storage.manifest.COMPACT_BELOW`), or when the journal outgrows a quarter
  of it.
- ``manifest.journal``: JSON Lines appended at each group commit.  Line 1 is the header
  (``{"journal": ..., "version": 2, "base": {...}, "config": {...}}``; ``base`` binds it to the
  ``manifest.json`` it extends: size, CRC32C of its last 4 KiB, byte span of its entries); then
  ``{"add": entry}`` / ``{"remove": file}`` records, each group closed by a
  ``{"commit": {"updated", "records", "summary"}}`` line.  A group commit appends its records
  and one commit line: it costs O(new entries), not O(store).  Readers take the head (config
  and per-layer summary) from the last commit line; records after it (a torn append) are not
  committed and are ignored.  A journal whose ``base`` does not match ``manifest.json`` (the
  manifest was edited or replaced) is ignored with a warning.

When ranks of a ``torch.distributed`` job write without Ray, each rank's owner writes
``manifest.rank{r:03d}.json`` (+ ``.journal``) (:func:`partial_name`); readers merge whatever
partial manifests remain (:func:`partial_manifests`, :func:`merge`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import crc32c as _crc32c

from mechray.errors import ShardError
from mechray.storage.entry import LayerSummary, entry_problem
from mechray.storage.files import UnsafeFileError, atomic_write, open_regular, read_regular
from mechray.storage.summary import Summary, layer_summaries

log = logging.getLogger(__name__)

FORMAT = "mechray.manifest"
JOURNAL = "mechray.manifest.journal"
VERSION = 2
READS = (1, 2)                 # versions this mechray reads (1: manifest.json alone)
MAIN = "manifest.json"
_PARTIAL = re.compile(r"manifest\.rank([0-9]{3,})\.json")
TAIL = 4096                    # bytes of manifest.json whose CRC32C binds a journal to it
TAIL_SCAN = 16 << 20           # how far back from its end a reader looks for the last commit


def partial_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def journal_name(filename: str) -> str:
    """``manifest.json`` -> ``manifest.journal`` (``manifest.rank001.json`` -> ``.rank001.journal``)."""
    return filename.removesuffix(".json") + ".journal"


def partial_manifests(root: Path) -> list[Path]:
    """The per-rank partial manifests in a store directory (names checked, sorted)."""
    return sorted(p for p in Path(root).glob("manifest.rank*.json") if _PARTIAL.fullmatch(p.name))


def is_partial(name: str) -> bool:
    return _PARTIAL.fullmatch(name) is not None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def empty(config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    now = utc_now()
    return {"format": FORMAT, "version": VERSION, "created": now, "updated": now,
            "config": config or {}, "shards": []}


class ManifestError(ShardError, ValueError):
    """A manifest cannot be read or is not a mechray manifest; the message says how to rebuild it."""


def rebuild_hint(where: str) -> str:
    store = where.rsplit("/", 1)[0] if "/" in where else "."
    if where.startswith("s3://"):
        return (f"every shard carries its own entry: on the machine that captured it, "
                f"`mechray repair --rebuild <storage_path>` then `mechray sync <storage_path>` "
                f"recreate and upload the manifest of {store}")
    return (f"every shard carries its own entry: `mechray repair --rebuild {store}` recreates "
            f"the manifest from the shard files (the damaged one is kept beside it)")


# --- reading ------------------------------------------------------------------------------------

def parse(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse and validate one ``manifest.json`` (version 1 or 2); :class:`ManifestError`
    (never a bare decode error)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ManifestError(f"{where} is not valid JSON ({str(exc)[:120]}): it is damaged or "
                            f"truncated; {rebuild_hint(where)}") from None
    return validate(doc, where)


def validate(doc: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest's shape, every entry included; :class:`ManifestError` naming
    ``where``, the entry and the problem.  Entries name shard files and nothing else."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a mechray manifest (format field missing or wrong); "
                            f"{rebuild_hint(where)}")
    if doc.get("version") not in READS:
        raise ManifestError(f"{where} has manifest version {doc.get('version')!r}; this mechray "
                            f"reads versions {', '.join(map(str, READS))}: upgrade mechray")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' must be a list of entries; {rebuild_hint(where)}")
    if not isinstance(doc.get("config", {}), dict):
        raise ManifestError(f"{where}: 'config' must be an object; {rebuild_hint(where)}")
    for i, entry in enumerate(shards):
        problem = entry_problem(entry)
        if problem:
            raise ManifestError(f"{where}: shard entry {i} {problem}; {rebuild_hint(where)}")
    return doc


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a manifest file (or journal): a regular file only, else
    :class:`~mechray.storage.files.UnsafeFileError`; :class:`ManifestError` when unreadable."""
    try:
        return read_regular(path, what)
    except UnsafeFileError:
        raise
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}); "
                            f"{rebuild_hint(str(path))}") from None


def read(path: Path) -> dict[str, Any]:
    """Read, parse and validate one manifest file (a regular file only: never a link, FIFO or
    device, never more than its size).  :func:`load` adds its journal."""
    return parse(read_bytes(Path(path), "manifest"), str(path))


def binding(data: bytes) -> dict[str, Any]:
    """What ties a journal to the ``manifest.json`` holding ``data``: size and CRC32C of the tail."""
    return {"bytes": len(data), "tail": f"crc32c:{_crc32c.crc32c(data[-TAIL:]):08x}"}


@dataclass
class Journal:
    """A parsed journal: its header, committed records in order, the last commit, its length."""

    header: dict[str, Any]
    records: list[dict[str, Any]]
    commit: Optional[dict[str, Any]]
    committed: int       # bytes up to the end of the last commit line


def parse_journal(data: bytes, where: str) -> Journal:
    """Parse journal bytes; records after the last commit line (a torn append) are dropped."""
    first, sep, rest = data.partition(b"\n")
    try:
        header = json.loads(first) if sep else None
    except ValueError:
        header = None
    if not (isinstance(header, dict) and header.get("journal") == JOURNAL and
            header.get("version") == VERSION and isinstance(header.get("base"), dict) and
            isinstance(header.get("config", {}), dict)):
        raise ManifestError(f"{where} is not a mechray manifest journal (bad header line); "
                            f"{rebuild_hint(where)}")
    records: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    commit, committed, at = None, len(first) + 1, len(first) + 1
    for line in rest.split(b"\n")[:-1]:  # the last piece has no newline: not complete
        at += len(line) + 1
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s: an unreadable line at byte %d; the records after the last commit "
                        "before it are ignored", where, at - len(line) - 1)
            break
        if isinstance(rec, dict) and isinstance(rec.get("commit"), dict):
            records += pending
            pending, commit, committed = [], rec["commit"], at
        elif isinstance(rec, dict) and ("add" in rec or isinstance(rec.get("remove"), str)):
            pending.append(rec)
        else:
            raise ManifestError(f"{where}: a journal record at byte {at - len(line) - 1} is "
                                f"neither add, remove nor commit; {rebuild_hint(where)}")
    return Journal(header, records, commit, committed)


def entry_order(entry: dict[str, Any]) -> tuple[int, int]:
    """The order entries are listed in: rank, then index."""
    return entry.get("rank", 0), entry.get("index", 0)


def combine(main: Optional[bytes], journal: Optional[bytes], where: str) -> dict[str, Any]:
    """A manifest document from the bytes of ``manifest.json`` and of its journal (either may
    be ``None``); entries sorted by rank then index, every entry validated."""
    if main is None:
        if journal is not None:
            log.warning("%s: a journal without its manifest.json is ignored; `mechray repair` "
                        "adopts the shards it listed", where)
        raise FileNotFoundError(f"{where} does not exist")
    return replay(parse(main, where), main, journal, where)[0]


def replay(doc: dict[str, Any], main: bytes, journal: Optional[bytes], where: str
           ) -> tuple[dict[str, Any], Optional[Journal]]:
    """``doc`` (parsed from ``main``) with the journal's committed records applied, and the
    parsed journal (``None`` when there is none or it does not extend ``main``)."""
    if journal is None:
        return doc, None
    jwhere = journal_name(where) if where.endswith(".json") else f"{where} journal"
    j = parse_journal(journal, jwhere)
    base = {k: j.header["base"].get(k) for k in ("bytes", "tail")}
    if base != binding(main):
        log.warning("%s does not extend %s (that file was replaced or edited since): the "
                    "journal is ignored; `mechray repair` adopts any shard it listed", jwhere, where)
        return doc, None
    if not j.records and j.commit is not None:
        doc["config"] = j.header.get("config", doc.get("config", {}))
        return doc, j
    by_file = {e["file"]: e for e in doc["shards"]}
    for rec in j.records:
        if "add" in rec:
            problem = entry_problem(rec["add"])
            if problem:
                raise ManifestError(f"{jwhere}: an added entry {problem}; {rebuild_hint(where)}")
            by_file[rec["add"]["file"]] = rec["add"]
        else:
            by_file.pop(rec["remove"], None)
    doc["shards"] = sorted(by_file.values(), key=entry_order)
    doc["config"] = j.header.get("config", doc.get("config", {}))
    if j.commit is not None and "summary" in j.commit:
        doc["summary"] = j.commit["summary"]
    return doc, j


def exists(root: Path, filename: str = MAIN) -> bool:
    """Whether a store directory holds this manifest, without reading it (a journal alone is
    no manifest)."""
    return os.path.lexists(Path(root) / filename)


def stamp(root: Path, filename: str = MAIN) -> Optional[tuple]:
    """``(size, mtime_ns, inode)`` of the manifest and its journal: moves with every commit.
    ``None`` when the manifest does not exist."""
    if not exists(root, filename):
        return None
    out: list[Optional[tuple[int, int, int]]] = []
    for name in (filename, journal_name(filename)):
        try:
            st = os.lstat(Path(root) / name)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def load(root: Path, filename: str = MAIN) -> dict[str, Any]:
    """The manifest document of a local store: ``manifest.json`` with its journal replayed."""
    root = Path(root)
    main, jpath = root / filename, root / journal_name(filename)
    data = read_bytes(main, "manifest") if os.path.lexists(main) else None
    jdata = read_bytes(jpath, "manifest journal") if os.path.lexists(jpath) else None
    return combine(data, jdata, str(main))


@dataclass(frozen=True)
class Head:
    """A manifest's head, read without any entry: config, per-layer summary, totals."""

    config: dict[str, Any]
    summary: dict[str, Any]                 # as stored (steps as runs)
    layers: dict[str, LayerSummary]
    shards: int
    bytes: int
    records: int                            # entries in the journal (0: all in manifest.json)
    entries: tuple[int, int]                # byte span of manifest.json's entry lines


def read_head(root: Path, filename: str = MAIN) -> Optional[Head]:
    """The head of a local version-2 manifest from its journal's header and last commit line
    (reads a few KiB whatever the store's size); ``None`` when there is no usable head (a
    version-1 store, an edited manifest.json...): then :func:`load` reads it all."""
    root = Path(root)
    jpath, main = root / journal_name(filename), root / filename
    if not os.path.lexists(jpath):
        return None
    try:
        with os.fdopen(open_regular(jpath, "manifest journal"), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            header = json.loads(fh.readline(1 << 20))
            fh.seek(max(0, size - TAIL_SCAN))
            tail = fh.read(TAIL_SCAN)
        with os.fdopen(open_regular(main, "manifest"), "rb") as fh:
            msize = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, msize - TAIL))
            mtail = fh.read(TAIL)
        base = header["base"]
        if header.get("journal") != JOURNAL or header.get("version") != VERSION or \
                {"bytes": base["bytes"], "tail": base["tail"]} != \
                {"bytes": msize, "tail": f"crc32c:{_crc32c.crc32c(mtail):08x}"}:
            return None
        commit = None
        for line in reversed(tail.split(b"\n")[:-1]):
            if line.startswith(b'{"commit"'):
                commit = json.loads(line)["commit"]
                break
        if commit is None:
            return None
        summary = commit["summary"]
        layers = layer_summaries(summary, str(jpath))
        start, end = base["entries"]
        return Head(header.get("config", {}), summary, layers, int(summary["shards"]),
                    int(summary["bytes"]), int(commit["records"]), (int(start), int(end)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no usable head in %s (%s); reading the whole manifest", jpath, exc)
        return None


def entry_starts(root: Path, head: Head, filename: str = MAIN):
    """Byte offsets where ``manifest.json``'s entry lines start, plus where they end (numpy,
    read 16 MiB at a time into one buffer: a few tens of MB whatever the manifest's size); the
    span comes from the journal's header, never from a text search."""
    import numpy as np

    start, end = head.entries
    step = 16 << 20
    buf = bytearray(step)
    parts = [np.array([start], dtype=np.int64)]
    with os.fdopen(open_regular(Path(root) / filename, "manifest"), "rb") as fh:
        if end <= start or end > os.fstat(fh.fileno()).st_size:
            return parts[0]
        fh.seek(start)
        for at in range(start, end, step):
            n = fh.readinto(memoryview(buf)[:min(step, end - at)])
            chunk = np.frombuffer(buf, dtype=np.uint8, count=n)
            parts.append(np.flatnonzero(chunk == 10).astype(np.int64) + at + 1)
            del chunk
    starts = np.concatenate(parts)
    return starts if starts[-1] == end else np.append(starts, end)


def entries_at(root: Path, starts, lo: int, hi: int, filename: str = MAIN
               ) -> list[dict[str, Any]]:
    """Entries ``lo..hi`` of ``manifest.json`` by their line offsets, each validated."""
    path = Path(root) / filename
    out = []
    with os.fdopen(open_regular(path, "manifest"), "rb") as fh:
        for i in range(lo, min(hi, len(starts) - 1)):
            fh.seek(int(starts[i]))
            line = fh.read(int(starts[i + 1] - starts[i])).strip().rstrip(b",")
            try:
                entry = json.loads(line)
            except ValueError:
                raise ManifestError(f"{path}: shard entry {i} is not valid JSON; "
                                    f"{rebuild_hint(str(path))}") from None
            problem = entry_problem(entry)
            if problem:
                raise ManifestError(f"{path}: shard entry {i} {problem}; "
                                    f"{rebuild_hint(str(path))}")
            out.append(entry)
    return out


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of manifests keyed by file name (later documents win), sorted by rank then index."""
    if not docs:
        return empty()
    out = dict(docs[0])
    by_file: dict[str, dict] = {}
    for doc in docs:
        for entry in doc["shards"]:
            by_file[entry["file"]] = entry
        if doc.get("config"):
            out["config"] = doc["config"]
    out["shards"] = sorted(by_file.values(), key=entry_order)
    return out


# --- writing ------------------------------------------------------------------------------------

def render(head: dict[str, Any], lines: list[str]) -> tuple[bytes, tuple[int, int]]:
    """``manifest.json``'s bytes: one head key per line, then one entry (JSON text) per line;
    returns them with the byte span of the entry lines."""
    top = "{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)},\n"
                          for k, v in head.items()) + ' "shards": [\n'
    body = ",\n".join(f"  {line}" for line in lines) + ("\n" if lines else "")
    start = len(top.encode())
    data = (top + body + " ]\n}\n").encode()
    return data, (start, start + len(body.encode()))


def record_line(record: dict[str, Any]) -> str:
    """One journal line's JSON text (compact; no NaN)."""
    return json.dumps(record, allow_nan=False, separators=(",", ":"))


def journal_start(data: bytes, span: tuple[int, int], config: dict[str, Any],
                  summary: dict[str, Any]) -> bytes:
    """A fresh journal for ``manifest.json`` bytes ``data``: header and one commit line."""
    header = {"journal": JOURNAL, "version": VERSION,
              "base": {**binding(data), "entries": list(span)}, "config": config}
    commit = {"commit": {"updated": utc_now(), "records": 0, "summary": summary}}
    return (record_line(header) + "\n" + record_line(commit) + "\n").encode()


def write_new(root: Path, config: dict[str, Any], entries: list[dict[str, Any]],
              filename: str = MAIN, created: Optional[str] = None) -> Path:
    """Replace a store's manifest by one listing ``entries`` (each checked first), atomically:
    ``manifest.json`` is replaced in one rename (a crash before leaves the old one whole), then
    a fresh journal is written (the old one no longer matches the new manifest.json)."""
    for e in entries:
        problem = entry_problem(e)
        if problem:
            raise ManifestError(f"new manifest of {root}: an entry {problem}")
    entries = sorted(entries, key=entry_order)
    summary = Summary(entries).to_json()
    now = utc_now()
    head = {"format": FORMAT, "version": VERSION, "created": created or now, "updated": now,
            "config": config, "summary": summary}
    data, span = render(head, [json.dumps(e, allow_nan=False) for e in entries])
    root = Path(root)
    atomic_write(root / filename, data)   # an old journal no longer matches it from here on
    atomic_write(root / journal_name(filename), journal_start(data, span, config, summary))
    return root / filename
