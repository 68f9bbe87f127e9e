"""Local servers and planted data for tests, examples and benchmarks.

Servers: moto's S3 and uvicorn, on 127.0.0.1.  Planted data for SAEs: rows that are sparse sums
of known directions, drawn by mechray (:func:`planted_dictionary`) or by SAELens' own code
(:func:`saelens_planted_dictionary`), scored with :func:`recovered_score` and
:func:`topk_ceiling`.

Usage::

    from mechray.testing import LocalS3

    with LocalS3() as s3:                        # needs `pip install 'moto[server]'`
        s3.create_bucket("demo")
        config = MechIntConfig(..., storage_backend="s3", s3_bucket="demo",
                               s3_endpoint_url=s3.url)
        s3.stop(); ...; s3.start()               # an outage, then the same endpoint again

    with serve_in_thread(app) as url:            # uvicorn in a thread, a free port
        ...

    store = rows_store(tmp / "store", x, per_shard=1000)   # rows [N, d] as layer "src" shards

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
    """Rows that are sparse sums of known unit directions: ``(dictionary, x)`` (mechray's own
    generator; :func:`saelens_planted_dictionary` draws rows with SAELens' code instead).

    ``dictionary`` [features, d] has random unit rows; each of the ``rows`` rows of ``x`` [rows,
    d] adds exactly ``active`` distinct directions with magnitudes uniform in [0.5, 2], a fixed
    random offset of norm ~0.5 and Gaussian noise of std ``noise``.  An SAE with ``k = active``
    should recover the directions: score it with :func:`recovered_score`.  Explained variance
    is capped below 1 by the TopK encoder, not by training (:func:`topk_ceiling`): ~0.89 at
    64x256x5, 0.83 at 64x256x8, 0.76 at 128x1024x16.
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


def saelens_planted_dictionary(d: int, features: int, active: int, rows: int, seed: int = 0,
                               std_magnitude: float = 0.0, orthogonalize: bool = True):
    """``(dictionary, x)`` drawn by SAELens' own synthetic-data code (``sae_lens.synthetic``):
    inputs mechray did not write, for judging mechray's SAEs.

    Usage::

        dictionary, x = saelens_planted_dictionary(64, 256, 8, 60000, seed=0)
        # train with {"k": 8, "expansion_factor": 8}; recovered_score(dictionary, sae.W_dec)

    ``FeatureDictionary(features, d)`` (unit directions, orthogonalised by its default
    initializer unless ``orthogonalize=False``; no bias) and ``ActivationGenerator(features,
    firing_probabilities=active / features, std_firing_magnitudes=std_magnitude)`` at its
    defaults otherwise: each direction fires independently (Bernoulli), so a row has ``active``
    directions *on average* (binomial spread), each with magnitude ``relu(1 + std_magnitude *
    N(0, 1))``; no noise.  Deterministic in ``seed`` (SAELens samples from torch's global
    generator: it is forked and restored here).  Needs ``sae-lens`` (mechray's ``dev`` extra).

    The spread in active count lowers what any TopK SAE can explain (:func:`topk_ceiling`:
    EV 0.80 at 64x256x5, 0.78 at 64x256x8, 0.71 at 128x1024x16, 0.76 at 256x2048x16).
    """
    try:
        from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
    except ImportError as exc:
        raise ImportError(f"saelens_planted_dictionary needs sae-lens ({exc}); install it with "
                          f"`pip install 'sae-lens>=6.54'` or mechray's dev extra, or use "
                          f"planted_dictionary (mechray's own generator)") from exc
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fd = FeatureDictionary(features, d, seed=seed,
                               **({} if orthogonalize else {"initializer": None}))
        gen = ActivationGenerator(features, active / features,
                                  std_firing_magnitudes=std_magnitude)
        with torch.no_grad():
            x = torch.cat([fd(gen.sample(min(4096, rows - start)))
                           for start in range(0, rows, 4096)])
    return fd.feature_vectors.detach().clone(), x


def topk_ceiling(dictionary, train, aside, k: int, steps: int = 1000, seed: int = 0) -> float:
    """Explained variance on ``aside`` of the best TopK SAE whose decoder is the *true*
    ``dictionary``: only the encoder and biases trained (Adam 2e-3, ``steps`` batches of 1,024
    rows of ``train``).  No TopK SAE with ``k`` latents per row reconstructs such rows much
    better (its linear encoder lets overlapping directions leak into each other), so this is
    the yardstick for a trained SAE's EV on planted data.
    """
    import torch

    from mechray.analysis.sae.model import SparseAutoencoder

    f, d = dictionary.shape
    sae = SparseAutoencoder(d, f, "topk", k)
    with torch.no_grad():
        sae.W_dec.copy_(dictionary)
        sae.W_enc.copy_(dictionary.T)
        sae.b_dec.copy_(train.mean(0))
    sae.W_dec.requires_grad_(False)
    opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.b_dec], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = train[torch.randint(0, len(train), (1024,), generator=g)]
        loss = (sae(xb) - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xh = sae(aside)
    return 1 - float((xh - aside).pow(2).sum() / (aside - aside.mean(0)).pow(2).sum())


def recovered_score(dictionary, decoder) -> float:
    """Mean over true directions of the best cosine with a learned decoder row (1 = all found)."""
    true = dictionary / dictionary.norm(dim=1, keepdim=True)
    decoder = decoder.detach()
    learned = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((true @ learned.T).max(dim=1).values.mean())


def rows_store(path, x, per_shard: int = 1000, **sampler_kw):
    """Rows ``x`` ([N, d]) captured as layer ``"src"`` in shards of ``per_shard`` rows, one step
    each, through the real sampler (``sampler_kw``: e.g. an S3 backend); returns the store."""
    from collections import OrderedDict

    from torch import nn

    from mechray.capture.sampler import ActivationSampler
    from mechray.storage.reader import ShardStore

    model = nn.Sequential(OrderedDict(src=nn.Identity()))
    sampler = ActivationSampler(layers=["src"], save_dir=str(path), use_ray=False, verbose=False,
                                max_activations_per_shard=per_shard, **sampler_kw)
    sampler.register_hooks(model)
    for step, chunk in enumerate(x.split(per_shard)):
        model(chunk)
        sampler.save_activations(step)
    sampler.close()
    return ShardStore(path)
