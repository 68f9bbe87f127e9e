"""A local S3 for tests, examples and benchmarks: moto's HTTP server on 127.0.0.1.

Usage::

    from mechray.testing import LocalS3

    with LocalS3() as s3:                        # needs `pip install 'moto[server]'`
        s3.create_bucket("demo")
        config = MechIntConfig(..., storage_backend="s3", s3_bucket="demo",
                               s3_endpoint_url=s3.url)
        s3.stop(); ...; s3.start()               # an outage, then the same endpoint again

Credentials are whatever the environment holds; the server accepts any (set
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` to dummy values when none are configured).
"""

from __future__ import annotations

import logging
import os


class LocalS3:
    """A moto ``ThreadedMotoServer`` on 127.0.0.1 (free port) that can be stopped and restarted."""

    def __init__(self, port: int = 0):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
            os.environ.setdefault(var, value)
        self._cls = ThreadedMotoServer
        self.port = port
        self.server = None
        self.outages = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

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
