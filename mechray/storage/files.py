"""Local files of a store, read and written safely: regular files only, replaced atomically.

Usage::

    from mechray.storage.files import atomic_write, open_regular, read_regular

    atomic_write(store / "manifest.json", data)       # readers see the old file or the new one
    data = read_regular(store / "manifest.json", "manifest")   # UnsafeFileError for a link, FIFO...
    fd = open_regular(store / shard_name, "shard")      # a descriptor of a regular file

A store directory may hold what someone else put there; nothing in it is followed (links),
waited on (FIFOs) or read unbounded, and nothing mechray writes is ever seen half-written.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from mechray.errors import ShardError


class UnsafeFileError(ShardError, ValueError):
    """A store held something at a file's place that mechray does not read: a link, a FIFO, a
    device, a directory, or a file larger than its header allows."""


def open_regular(path, what: str = "file") -> int:
    """A read-only descriptor of ``path`` when it is a regular file (never a link, FIFO or device).

    Usage::

        fd = open_regular(store / "manifest.json", "manifest")   # UnsafeFileError otherwise
        with os.fdopen(fd, "rb") as fh: ...

    ``O_NOFOLLOW`` refuses a link at ``path`` itself; ``O_NONBLOCK`` makes opening a FIFO return
    at once (then refused), so nothing a store holds can make mechray hang or read a device.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.islink(path):
            raise UnsafeFileError(f"{what} {path} is a symbolic link: mechray reads only regular "
                                  f"files inside the store, never a path to follow. Replace the "
                                  f"link by the file itself") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if \
            stat.S_ISDIR(st.st_mode) else "a device or socket"
        raise UnsafeFileError(f"{what} {path} is {kind}, not a regular file: refused (mechray "
                              f"reads only regular files inside the store). Remove it")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def read_regular(path, what: str = "file", limit: Optional[int] = None) -> bytes:
    """All bytes of a regular file (see :func:`open_regular`), at most its size at open time
    and at most ``limit``: a file growing while read, or a huge one, is never read unbounded."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise UnsafeFileError(f"{what} {path} is {size} bytes, more than the {limit} "
                                  f"mechray reads for it: refused")
        return fh.read(size)


def atomic_write(path: Path, data: bytes | memoryview | Callable[[Any], Any]) -> Any:
    """Write ``path`` so readers see the old file or the whole new one, never a part.

    ``data`` is bytes, or a function that writes into the open temp file (its return value is
    returned).  The temp file is fsynced, renamed over ``path``, and the directory fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; readers may be other users of a shared disk
        with os.fdopen(fd, "wb") as fh:
            result = data(fh) if callable(data) else fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return result
