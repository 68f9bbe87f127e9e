"""Private one-shard stores for uploads, so an upload runs through the same engine as a store.

Usage::

    from mechray.api.upload_store import UploadStores

    stores = UploadStores(keep=8)
    store = stores.get(upload)          # a ShardStore holding the upload's layers (made once)
    stores.close()                      # removes every temporary store

Each store is a directory under a private temporary root created on the first upload; the
``keep`` most recently used stay (keyed by the upload's sha256), older ones are deleted.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from mechray.api.uploads import Upload
from mechray.storage.reader import ShardStore


class UploadStores:
    """The last ``keep`` uploads, each as a private single-shard store."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._root: Optional[Path] = None             # created on the first upload
        self._stores: OrderedDict[str, ShardStore] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, upload: Upload) -> ShardStore:
        with self._lock:
            store = self._stores.get(upload.sha256)
            if store is not None:
                self._stores.move_to_end(upload.sha256)
                return store
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="mechray-uploads-"))
                weakref.finalize(self, shutil.rmtree, self._root, ignore_errors=True)
            root = self._root / upload.sha256
        _write(upload, root)
        store = ShardStore(str(root))
        with self._lock:
            self._stores[upload.sha256] = store
            while len(self._stores) > self.keep:
                old, _ = self._stores.popitem(last=False)
                shutil.rmtree(self._root / old, ignore_errors=True)
        return store

    def close(self) -> None:
        """Remove the temporary stores."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _write(upload: Upload, root: Path) -> None:
    from mechray.storage.manifest import Manifest
    from mechray.storage.shard import Chunk, PendingShard, shard_name
    from mechray.storage.sink import ShardSink, StorageTarget

    target = StorageTarget(backend="local", local_dir=str(root))
    payload = PendingShard(
        name=shard_name(0, 0), index=0, step=0, rank=0, world_size=1,
        max_rows=max(len(t) for t in upload.tensors.values()),
        chunks={la: [Chunk(rows=t, step=0, positions=None)] for la, t in upload.tensors.items()},
        layer_info={}).materialize()
    Manifest(target, {"source": "upload"}).add(ShardSink(target).write(payload))
