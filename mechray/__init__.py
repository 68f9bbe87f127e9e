"""mechray: capture, store, analyse and serve a model's activations at cluster scale with Ray.

Usage::

    import pytorch_lightning as pl
    from mechray import MechIntCallback, MechIntConfig

    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=200)
    trainer = pl.Trainer(callbacks=[MechIntCallback(config)])
    trainer.fit(model, dataloader)            # shards + manifest.json in ./mechint_cache/

The data flow, one module per stage: ``capture`` (hooks, row cache) → ``transport`` (writer
threads or the Ray ``writer`` pool) → ``storage``/``manifest`` (local disk, S3) → ``store``
(reading) → analysis → report/serve.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

from mechray.capture import ActivationSampler
from mechray.config import ConfigError, MechIntConfig
from mechray.hooks import MechIntHooks
from mechray.layers import UnknownLayerError
from mechray.store import ShardError, ShardStore
from mechray.transport import ShardWriteError

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

# Names whose modules pull in optional dependencies (Lightning, FastAPI, scikit-learn) load lazily.
_LAZY = {
    "MechIntCallback": "mechray.callback",
    "EvalMechIntRunner": "mechray.runner",
    "FastAPIIntegrationMixin": "mechray.api",
    "start_writer_pool": "mechray.writer",
}

__all__ = ["ActivationSampler", "ConfigError", "MechIntCallback", "MechIntConfig", "MechIntHooks",
           "ShardError", "ShardStore", "ShardWriteError", "UnknownLayerError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mechray' has no attribute {name!r}")
