"""Manual hooks for plain training loops (the seed's Pattern 2).

Usage::

    from mechray import MechIntConfig, MechIntHooks

    hooks = MechIntHooks(config)
    hooks.register_hooks(model)
    for step, batch in enumerate(dataloader):
        outputs = model(batch)
        ...
        if step % config.save_hidden_every_n_steps == 0:
            hooks.sampler.save_activations(step)
            hooks.sampler.clear_cache()
    hooks.close()                     # removes every handle, waits until shards are durable

    with MechIntHooks(config).attach(model) as hooks:   # the same, with removal guaranteed
        ...
    MechIntHooks(config, tokenizer=tok)   # rows of tok's special tokens ([CLS], ...) left out
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import nn

from mechray.capture.sampler import ActivationSampler
from mechray.config import MechIntConfig


class MechIntHooks:
    """Owns an :class:`ActivationSampler` built from a config (object or dict)."""

    def __init__(self, config: MechIntConfig | dict[str, Any], rank: int = 0, world_size: int = 1,
                 tokenizer: Any = None):
        """``tokenizer``: its special tokens' rows are left out of capture (unless
        ``config.exclude_special_tokens`` is off); see :class:`ActivationSampler`."""
        self.config = MechIntConfig.coerce(config)
        self.sampler = ActivationSampler(config=self.config, rank=rank, world_size=world_size,
                                         tokenizer=tokenizer)

    def register_hooks(self, model: nn.Module) -> "MechIntHooks":
        self.sampler.register_hooks(model)
        return self

    def remove_hooks(self) -> None:
        self.sampler.remove_hooks()

    def save_activations(self, global_step: int, mask: Any = None,
                         input_ids: Any = None) -> Optional[str]:
        """``hooks.save_activations(step, mask=enc["attention_mask"])``: see
        :meth:`ActivationSampler.save_activations`."""
        return self.sampler.save_activations(global_step, mask=mask, input_ids=input_ids)

    def close(self) -> None:
        """Remove every hook, then wait until every saved shard is durable."""
        self.sampler.close()

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator["MechIntHooks"]:
        self.register_hooks(model)
        try:
            yield self
        finally:
            self.close()

    def __enter__(self) -> "MechIntHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
