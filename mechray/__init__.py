"""mechray: capture, store, analyse and serve a model's activations at cluster scale with Ray.

Usage::

    import pytorch_lightning as pl
    from mechray import MechIntCallback, MechIntConfig

    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=200)
    trainer = pl.Trainer(callbacks=[MechIntCallback(config)])
    trainer.fit(model, dataloader)            # shards + manifest.json in ./mechint_cache/

The packages follow the data: ``capture`` (hooks, row cache) → ``storage`` (writer threads or
the Ray writer pool, shards and manifest on local disk and S3, the reader) → ``analysis``
(statistics and fits as Ray tasks, the runner and report) → ``api`` (FastAPI routes, Ray Serve).
``config`` (one typed config), ``errors`` (one hierarchy) and ``cli`` sit at the top.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

from mechray.capture.hooks import MechIntHooks
from mechray.capture.layers import UnknownLayerError
from mechray.capture.sampler import ActivationSampler
from mechray.config import ConfigError, MechIntConfig
from mechray.storage.reader import ShardError, ShardStore
from mechray.storage.transport import ShardWriteError
from mechray.version import __version__ as __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Names whose modules pull in optional dependencies (Lightning, FastAPI, scikit-learn) load lazily.
_LAZY = {
    "MechIntCallback": "mechray.capture.callback",
    "EvalMechIntRunner": "mechray.analysis.runner",
    "FastAPIIntegrationMixin": "mechray.api.routes",
    "start_writer_pool": "mechray.storage.writer_pool",
}

__all__ = ["ActivationSampler", "ConfigError", "MechIntCallback", "MechIntConfig", "MechIntHooks",
           "ShardError", "ShardStore", "ShardWriteError", "UnknownLayerError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mechray' has no attribute {name!r}")
