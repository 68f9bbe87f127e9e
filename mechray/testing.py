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
