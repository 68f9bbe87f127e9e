"""The Lightning callback (the seed's Pattern 1).

Usage::

    import pytorch_lightning as pl
    from mechray import MechIntCallback, MechIntConfig

    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=200)
    trainer = pl.Trainer(callbacks=[MechIntCallback(config)])    # or MechIntCallback(config={...})
    trainer.fit(model, dataloader)                               # shards in ./mechint_cache/

Hooks exist only while a sampled step runs (``global_step % save_hidden_every_n_steps == 0``,
step 0 included), so other steps run the model untouched.  The step's rows are handed to the
writer right after its optimizer step (all micro-batches of an accumulated step go in one
shard).  With ``steps_per_shard=N`` the rows of N sampled steps share one shard (named by the
last of them; each row's step is in the metadata), cut earlier when the next step would push
rows out of the bounded cache: fewer, larger shards when capturing often.

By default (``steps_per_shard=None``) a sparse interval writes one shard per sampled step, and
every-step capture (``save_hidden_every_n_steps=1``) gathers consecutive steps into one shard
until it would pass ``shard_target_mb`` or ``max_activations_per_shard`` rows per layer, or its
first step is ``shard_max_seconds`` old: one writer call, one file and one manifest entry per
~``shard_target_mb`` instead of per step, which is what keeps every-step capture cheap.  Rows
held for a shard are handed off at the latest on the next step past ``shard_max_seconds``, at
validation, at a checkpoint (``state_dict``), at epoch end, at fit end and on an exception; at
fit end and on an exception everything handed off is flushed to durable storage.
Under DDP every rank captures its own batch into rank-named shards; the callback's
``state_dict`` carries shard numbering across a resume so nothing is overwritten.

Token models: when a batch is a dict (a tokenizer's output), its ``config.mask_key``
(``attention_mask``) selects the positions stored and its ``config.token_ids_key``
(``input_ids``) gives each row's token; for other batches pass ``tokens_fn=lambda batch:
(mask, input_ids)`` (either may be ``None``).  At fit end the log line names any rows the
``max_activations_per_shard`` cap dropped, per layer.

``probe_inputs`` (a tensor the model accepts) adds, after each sampled step, one eval-mode pass
over that fixed batch saved as its own shard with its inputs: the same inputs at every saved
step, which is what ``dynamics`` needs to compare representations across training.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl

from mechray.capture.layers import resolve_layers
from mechray.capture.sampler import ActivationSampler
from mechray.config import MechIntConfig
from mechray.storage.manifest import merge_rank_manifests
from mechray.storage.target import StorageTarget
from mechray.storage.transport import wants_ray

log = logging.getLogger(__name__)


class MechIntCallback(pl.Callback):
    """Captures activations of ``config.sample_layers`` during ``trainer.fit``."""

    def __init__(self, config: MechIntConfig | dict[str, Any], probe_inputs: Any = None,
                 tokens_fn: Optional[Callable[[Any], Any]] = None):
        super().__init__()
        self.config = MechIntConfig.coerce(config)
        self.probe_inputs = probe_inputs
        self.tokens_fn = tokens_fn
        if probe_inputs is not None and (self.config.steps_per_shard or 1) > 1:
            raise ValueError(f"probe_inputs needs steps_per_shard=1 (got "
                             f"{self.config.steps_per_shard}): probe shards hold one step each")
        self.sampler: Optional[ActivationSampler] = None
        self._capturing: Optional[int] = None
        self._pending: list[int] = []      # sampled steps whose rows wait in the cache
        self._step_rows = 0                # most rows one layer got in the last sampled step
        self._rows_before = 0
        self._resume_index = 0
        self._resume_run_id: Optional[str] = None
        self._hook_seconds = 0.0
        self._held_since: Optional[float] = None   # when the oldest held step began
        self._last_end: Optional[float] = None     # when the last sampled step ended
        self._bytes_at_save = 0                    # sampler.bytes_captured at the last hand-off

    # --- lifecycle -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.sampler is not None:
            return
        resolve_layers(pl_module, self.config.sample_layers)  # unknown names fail before step 0
        self.sampler = ActivationSampler(config=self.config, rank=trainer.global_rank,
                                         world_size=trainer.world_size)
        self.sampler.next_index = self._resume_index

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # start writers (Ray actors) and claim the store now, not inside the first sampled step;
        # after a checkpoint restore, so a resumed run claims with its old run id
        if self.sampler is not None:
            _ = self.sampler.transport

    def _live(self) -> ActivationSampler:
        """The sampler made in ``setup``; a hook called before it is a Lightning misuse."""
        if self.sampler is None:
            raise RuntimeError("MechIntCallback was used before Trainer.fit set it up; pass it "
                               "in Trainer(callbacks=[...]) and call trainer.fit")
        return self.sampler

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._pending and self._capturing is None and self._held_since is not None and \
                time.monotonic() - self._held_since >= self.config.shard_max_seconds:
            self._save()  # held rows waited long enough (time bound of a gathered shard)
        if self._capturing is None and step % self.config.save_hidden_every_n_steps == 0:
            t0 = time.perf_counter()
            sampler = self._live()
            if self._pending and max(sampler.cached_rows.values(), default=0) + \
                    self._step_rows > self.config.max_activations_per_shard:
                self._save()  # this step would push older rows out of the bounded cache
            if not self._pending:
                self._held_since = time.monotonic()
            self._rows_before = max(sampler.cached_rows.values(), default=0)
            sampler.current_step = step
            sampler.register_hooks(pl_module)
            self._capturing = step
            self._hook_seconds += time.perf_counter() - t0
        if self._capturing is not None:
            self._set_tokens(batch)

    def _set_tokens(self, batch: Any) -> None:
        """The mask and token ids of this batch: ``tokens_fn(batch)``, or the batch's keys."""
        cfg, mask, ids = self.config, None, None
        if self.tokens_fn is not None:
            got = self.tokens_fn(batch)
            mask, ids = got if isinstance(got, tuple) else (got, None)
        elif isinstance(batch, Mapping):
            mask = batch.get(cfg.mask_key) if cfg.mask_key else None
            ids = batch.get(cfg.token_ids_key) if cfg.token_ids_key else None
            if mask is None and ids is not None and cfg.mask_key:
                log.debug("mechray: batch has %r but no %r; every position is stored",
                          cfg.token_ids_key, cfg.mask_key)
        self._live().set_tokens(mask, ids)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._capturing is not None and trainer.global_step != self._capturing:
            step = self._capturing
            self._hand_off()
            if self.probe_inputs is not None:
                self._probe(pl_module, step)
            pl_module.log_dict(self.figures(), on_step=True, on_epoch=False, sync_dist=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hand_off(force=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending and self._capturing is None:  # validation may take long: hand off now
            self._save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.sampler is None:
            return
        log.warning("mechray: training raised %s; flushing captured shards", type(exception).__name__)
        try:
            self._hand_off(force=True)
            self.sampler.close()
        except Exception as exc:  # never mask the training error; the shards stay in `failed`
            log.error("mechray: could not flush shards after %s: %s",
                      type(exception).__name__, exc)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.sampler is not None:
            self.sampler.remove_hooks()
            if self._pending and self._capturing is None:  # held steps a fit end did not see
                self._save()
                self.sampler.flush()

    # --- checkpointing -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Where a checkpoint keeps this callback's state: one key per store and layers, so two
        callbacks (two stores, or two layer sets) in one Trainer each resume their own numbering.
        Checkpoints written under the class name alone still load (Lightning falls back)."""
        c = self.config
        where = f"s3://{c.s3_bucket}/{c.s3_prefix}" if c.storage_backend == "s3" else \
            str(c.storage_path)
        return self._generate_state_key(store=where, layers=tuple(c.sample_layers))

    def state_dict(self) -> dict[str, Any]:
        if self._pending and self._capturing is None:  # a checkpoint covers the held steps too:
            self._save()                               # hand them off so the index counts them
        index = self.sampler.next_index if self.sampler and self.sampler.next_index is not None \
            else self._resume_index
        run_id = self.sampler.run_id if self.sampler is not None else self._resume_run_id
        return {"next_shard_index": int(index), "config": self.config.to_dict(),
                "run_id": run_id}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before per-store keys holds the state under the class name."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and type(self).__qualname__ in states:
            self.load_state_dict(states[type(self).__qualname__])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_index = max(self._resume_index, int(state_dict.get("next_shard_index", 0)))
        self._resume_run_id = state_dict.get("run_id") or self._resume_run_id
        if self.sampler is not None:
            self.sampler.next_index = max(self.sampler.next_index or 0, self._resume_index)
            if self._resume_run_id and self.sampler._transport is None:
                self.sampler.run_id = self._resume_run_id  # the resumed run keeps its claim

    # --- internals -----------------------------------------------------------------------------
    def _hand_off(self, force: bool = False) -> None:
        """End the sampled step being captured; write a shard once ``steps_per_shard`` sampled
        steps are cached (or at once with ``force``: epoch end, fit end, exceptions)."""
        step, self._capturing = self._capturing, None
        t0 = time.perf_counter()
        if step is not None:
            sampler = self._live()
            sampler.remove_hooks()
            sampler.clear_tokens()
            self._pending.append(step)
            self._step_rows = max(sampler.cached_rows.values(), default=0) - self._rows_before
        now = time.monotonic()
        gap = None if self._last_end is None else now - self._last_end
        if step is not None:
            self._last_end = now
        if self._pending and (force or self._full(gap, now)):
            self._save()
        self._hook_seconds += time.perf_counter() - t0

    def _full(self, gap: Optional[float], now: float) -> bool:
        """Whether the held sampled steps make a shard now (else the next step joins them)."""
        cfg, n = self.config, len(self._pending)
        if cfg.steps_per_shard is not None:
            return n >= cfg.steps_per_shard
        if self.probe_inputs is not None or cfg.save_hidden_every_n_steps > 1 or gap is None:
            return True  # sparse sampling, probes, or no step rate known yet: a shard per step
        held = self._live().bytes_captured - self._bytes_at_save
        first = self._held_since if self._held_since is not None else now
        return (held + held / n > cfg.shard_target_mb * 1e6 or
                now + gap - first > cfg.shard_max_seconds)

    def _save(self) -> None:
        """Hand the cached rows of the pending sampled steps to the writer as one shard."""
        last, self._pending = self._pending[-1], []
        sampler = self._live()
        self._held_since = None
        self._bytes_at_save = sampler.bytes_captured
        sampler.save_activations(last)

    def _probe(self, pl_module: pl.LightningModule, step: int) -> None:
        """Run the fixed probe batch (eval mode, no grad) and save it as a shard of its own, with
        its inputs, so every saved step has activations of the same inputs (for ``dynamics``)."""
        import torch

        t0 = time.perf_counter()
        sampler, was_training = self._live(), pl_module.training
        sampler.current_step = step
        pl_module.eval()
        try:
            sampler.register_hooks(pl_module, inputs=True)
            with torch.no_grad():
                probe = self.probe_inputs
                if isinstance(probe, Mapping):
                    pl_module(**{k: v.to(pl_module.device) for k, v in probe.items()})
                else:
                    pl_module(probe.to(pl_module.device))
        finally:
            sampler.remove_hooks()
            pl_module.train(was_training)
        sampler.save_activations(step)
        self._hook_seconds += time.perf_counter() - t0

    def figures(self) -> dict[str, float]:
        """What the callback has done so far (also logged through the Lightning logger)."""
        s = self.sampler
        stats = s.stats if s else None
        return {
            "mechray/rows_captured": float(s.rows_captured if s else 0),
            "mechray/bytes_captured": float(s.bytes_captured if s else 0),
            "mechray/shards_written": float(stats.shards_written if stats else 0),
            "mechray/shards_in_flight": float(stats.in_flight if stats else 0),
            "mechray/train_thread_seconds": float(self._hook_seconds + (s.capture_seconds if s else 0)
                                                  + (stats.blocked_seconds if stats else 0)),
        }

    def _finish(self, trainer: pl.Trainer) -> None:
        if self.sampler is None:
            return
        self._hand_off(force=True)
        self.sampler.close()
        if trainer.world_size > 1 and not wants_ray(self.config):
            trainer.strategy.barrier("mechray-manifest")
            if trainer.is_global_zero:
                merge_rank_manifests(StorageTarget.from_config(self.config), self.config.to_dict())
            trainer.strategy.barrier("mechray-manifest-merged")
        if self.config.verbose and trainer.is_global_zero:
            f = self.figures()
            dropped = {k: v for k, v in self.sampler.rows_dropped.items() if v}
            log.info("mechray: %d shard(s), %.1f MB captured on rank 0 into %s%s",
                     f["mechray/shards_written"], f["mechray/bytes_captured"] / 1e6,
                     self.config.storage_path,
                     f"; rows DROPPED by max_activations_per_shard="
                     f"{self.config.max_activations_per_shard}: {dropped} (raise it, set "
                     f"rows_per_step, or lower save_hidden_every_n_steps/steps_per_shard to keep "
                     f"them)" if dropped else "; no rows dropped")
            if dropped:
                log.warning("mechray: %d row(s) dropped by the max_activations_per_shard cap: %s",
                            sum(dropped.values()), dropped)

