"""Local servers for tests, examples and benchmarks: moto's S3 and uvicorn, on 127.0.0.1.

Usage::

    from mechray.testing import LocalS3

    with LocalS3() as s3:                        # needs `pip install 'moto[server]'`
        s3.create_bucket("demo")
        config = MechIntConfig(..., storage_backend="s3", s3_bucket="demo",
                               s3_endpoint_url=s3.url)
        s3.stop(); ...; s3.start()               # an outage, then the same endpoint again

    with serve_in_thread(app) as url:            # uvicorn in a thread, a free port
        ...

Credentials are whatever the environment holds; the server accepts any (set
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` to dummy values when none are configured).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator


class LocalS3:
    """A moto ``ThreadedMotoServer`` on 127.0.0.1 (free port) that can be stopped and restarted."""

    def __init__(self, port: int = 0):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
            os.environ.setdefault(var, value)
        self._cls = ThreadedMotoServer
        self.port = port
        self.server: Any = None
        self.outages = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.outages += 1

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_thread(app, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app (a FastAPI app with mechray's routes, say) with uvicorn on 127.0.0.1 in
    a background thread; yields its base URL and stops it on exit.

    Usage::

        with serve_in_thread(app) as url:
            httpx.get(f"{url}/interpret/layers")
    """
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mechray-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    try:
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {timeout_s}s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def planted_dictionary(d: int, features: int, active: int, rows: int, seed: int = 0,
                       noise: float = 0.01):
    """Rows that are sparse sums of known unit directions: ``(dictionary, x)``.

    ``dictionary`` [features, d] has random unit rows; each of the ``rows`` rows of ``x`` [rows,
    d] adds ``active`` distinct directions with magnitudes uniform in [0.5, 2], a fixed random
    offset of norm ~0.5 and Gaussian noise of std ``noise``.  An SAE with ``k = active`` should
    recover the directions: score it with :func:`recovered_score`.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(features, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = 0.5 * torch.randn(d, generator=g) / d ** 0.5
    parts = []
    for start in range(0, rows, 4096):     # bounded memory for large rows x features
        n = min(4096, rows - start)
        idx = torch.rand(n, features, generator=g).topk(active, dim=1).indices
        mags = 0.5 + 1.5 * torch.rand(n, active, generator=g)
        parts.append(torch.zeros(n, features).scatter_(1, idx, mags) @ dictionary)
    x = torch.cat(parts) + offset + noise * torch.randn(rows, d, generator=g)
    return dictionary, x


def recovered_score(dictionary, decoder) -> float:
    """Mean over true directions of the best cosine with a learned decoder row (1 = all found)."""
    true = dictionary / dictionary.norm(dim=1, keepdim=True)
    decoder = decoder.detach()
    learned = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((true @ learned.T).max(dim=1).values.mean())
