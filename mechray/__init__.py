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
from typing import TYPE_CHECKING, Any

from mechray.version import __version__ as __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Every public name loads on first use (PEP 562), so ``import mechray`` and the commands that only
# read manifests (``mechray ls``, ``sync``, ``--help``) import neither torch nor Ray.
# ``from mechray import MechIntHooks`` imports mechray.capture.hooks then, as before.
_LAZY = {
    "ActivationSampler": "mechray.capture.sampler",
    "ConfigError": "mechray.config",
    "EvalMechIntRunner": "mechray.analysis.runner",
    "FastAPIIntegrationMixin": "mechray.api.routes",
    "MechIntCallback": "mechray.capture.callback",
    "MechIntConfig": "mechray.config",
    "MechIntHooks": "mechray.capture.hooks",
    "ShardError": "mechray.storage.reader",
    "ShardStore": "mechray.storage.reader",
    "ShardWriteError": "mechray.storage.transport",
    "UnknownLayerError": "mechray.capture.layers",
    "start_writer_pool": "mechray.storage.writer_pool",
}

__all__ = ["ActivationSampler", "ConfigError", "MechIntCallback", "MechIntConfig", "MechIntHooks",
           "ShardError", "ShardStore", "ShardWriteError", "UnknownLayerError",
           "EvalMechIntRunner", "FastAPIIntegrationMixin", "start_writer_pool"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each loads on first use
    from mechray.analysis.runner import EvalMechIntRunner
    from mechray.api.routes import FastAPIIntegrationMixin
    from mechray.capture.callback import MechIntCallback
    from mechray.capture.hooks import MechIntHooks
    from mechray.capture.layers import UnknownLayerError
    from mechray.capture.sampler import ActivationSampler
    from mechray.config import ConfigError, MechIntConfig
    from mechray.storage.reader import ShardError, ShardStore
    from mechray.storage.transport import ShardWriteError
    from mechray.storage.writer_pool import start_writer_pool


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mechray' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value           # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
