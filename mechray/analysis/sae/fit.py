"""One SAE's training run in this process, and one pass over a layer's rows that feeds several.

Usage::

    from mechray.analysis.sae.fit import SAEFit, train_together

    data = LayerRows(ctx.store, "popt", params, device)        # the rows, read once per batch
    fits = [SAEFit(get_analysis("sae", {"k": k}), ctx, "popt", data, device) for k in (16, 32)]
    train_together(fits, data, "popt")       # each batch is fed to every SAE that needs it
    results = [f.result() for f in fits]   # the single-fit result of each

An :class:`SAEFit` is what ``sae.fit`` does for one SAE, split at the batch: the budget, lr and
trainer (same seed: same start), its resumable checkpoint (restored on creation), early stop on
held-out rows, and the result.  :func:`train_together` runs the batch stream once: batch ``i``
goes to every SAE whose next step is ``i`` (a fit resumed at step 100 waits until the stream
gets there; one with a smaller budget or an early stop simply stops taking batches), so each
SAE sees exactly the batches it would see trained alone, in the same order: the same SAE.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from tqdm.auto import tqdm

from mechray._util import json_safe
from mechray.analysis.base import Context
from mechray.analysis.sae.budget import (
    FEW_STEPS,
    EarlyStop,
    auto_lr,
    budget_rule,
    budget_steps,
    early_stopping,
    fvu,
    loss_flat,
    sae_warnings,
)
from mechray.analysis.sae.evaluate import evaluate
from mechray.analysis.sae.model import SparseAutoencoder
from mechray.analysis.sae.rows import LayerRows
from mechray.analysis.sae.train import SAETrainer, dead_saelens

if TYPE_CHECKING:
    from mechray.analysis.sae.analysis import SAEAnalysis
    from mechray.analysis.sae.params import SAEParams


class SAEFit:
    """One SAE of ``analysis.params`` on ``data`` (shared with other fits of the same rows)."""

    def __init__(self, analysis: "SAEAnalysis", ctx: Context, layer: str, data: LayerRows,
                 device: torch.device, name: Optional[str] = None):
        p: SAEParams = analysis.params
        self.analysis, self.layer, self.data, self.device, self.name = \
            analysis, layer, data, device, name
        self.n_latents = p.n_latents or p.expansion_factor * data.d
        analysis._check_sizes(data.d, self.n_latents)
        self.per_epoch = data.steps_per_epoch()
        self.total = budget_steps(p, self.per_epoch, self.n_latents)
        self.lr = p.lr or auto_lr(self.n_latents, self.total)
        self.warmup = p.warmup_steps if p.warmup_steps is not None else \
            min(1000, self.total // 20)
        gen = torch.Generator().manual_seed(p.seed)
        sae = SparseAutoencoder(data.d, self.n_latents, p.architecture, p.k,
                                generator=gen).to(device)
        self.aux_k = min(data.d // 2 if p.aux_k is None else p.aux_k, self.n_latents)
        self.trainer = SAETrainer(sae, self.lr, p.l1_coefficient, self.aux_k, p.aux_coefficient,
                                  p.dead_steps_threshold, total_steps=self.total,
                                  warmup_steps=self.warmup, l0_coefficient=p.l0_coefficient,
                                  bandwidth=p.jumprelu_bandwidth)
        self.losses = torch.empty(self.total, device=device)
        self.ckpt = analysis._checkpoint(ctx, layer, data)
        self.resumed = self.ckpt.restore(self.trainer, self.total) if self.ckpt else None
        self.rows_seen, self.before, self.seconds, self.epoch = 0, 0.0, 0.0, 0
        if self.resumed is not None:
            done, self.rows_seen, self.before = self.resumed
            self.losses[: len(done)] = done.to(device)
        self.watch = early_stopping(p) and data.in_memory
        self.stop: Optional[EarlyStop] = None
        self.done = self.trainer.n_steps >= self.total

    @property
    def p(self) -> "SAEParams":
        return self.analysis.params

    def wants(self, step: int) -> bool:
        """Whether batch ``step`` of the stream is this SAE's next one."""
        return not self.done and self.trainer.n_steps == step

    def feed(self, batch: torch.Tensor, t0: float) -> None:
        """One training step on ``batch`` (``t0``: when the pass started, for the seconds)."""
        p, trainer, data = self.p, self.trainer, self.data
        if trainer.n_steps == 0 and data.sample is not None:
            trainer.sae.init_from_data(data.sample, p.normalize_input, p.b_dec_init)
        step = trainer.n_steps          # (the right-hand side runs first: it counts the step)
        self.losses[step] = trainer.step(batch)
        self.rows_seen += len(batch)
        self.epoch = data.epoch
        if self.watch and self.stop is None:      # the held-out rows are split off by now
            self.stop = EarlyStop(data.eval_rows(), p.eval_every or max(5, self.total // 20),
                                  start=max(self.warmup, self.total // 5,
                                            min(FEW_STEPS, self.total)))
        self.seconds = self.before + time.perf_counter() - t0
        if trainer.n_steps >= self.total or \
                (self.stop is not None and self.stop.check(trainer.sae, trainer.n_steps)):
            self.done = True
        elif self.ckpt is not None and trainer.n_steps % p.checkpoint_every == 0:
            self.ckpt.save(trainer, self.losses[: trainer.n_steps], self.rows_seen, self.seconds)

    def result(self) -> dict[str, Any]:
        """The ``sae`` result of this SAE (held-out metrics, files, ...): ``sae.fit``'s layout."""
        p, trainer, data = self.p, self.trainer, self.data
        sae = trainer.sae
        losses = self.losses[: trainer.n_steps].cpu()
        if self.stop is not None:
            self.stop.restore(sae)
        sae.eval()
        if p.architecture == "batchtopk" and data.sample is not None:
            sae.calibrate_threshold(data.sample[: p.max_eval_rows])
        window = min(p.dead_steps_threshold, trainer.n_steps)
        held = data.eval_rows()
        result = evaluate(sae, held, trainer.steps_since_fired >= window, p.batch_size)
        result.update(architecture=p.architecture, d_in=data.d, n_latents=self.n_latents,
                      k=None if p.architecture == "relu" else p.k, trained=True, pretrained=None,
                      dead_saelens=dead_saelens(trainer))
        if data.sample is not None:     # training rows, as many as held out: memorisation
            result["train_explained_variance"] = 1 - fvu(sae, data.sample[: len(held)])
        every = max(1, trainer.n_steps // 100)
        curve = [[i + 1, round(float(v), 6)] for i, v in enumerate(losses.tolist())
                 if (i + 1) % every == 0]
        flat, drop = loss_flat(losses)
        result["train"] = {"steps": trainer.n_steps, "epochs": self.epoch + 1,
                           "rows_seen": self.rows_seen, "seconds": self.seconds,
                           "rows_per_second": self.rows_seen / max(self.seconds, 1e-9),
                           "lr": self.lr, "lr_auto": p.lr is None, "warmup_steps": self.warmup,
                           "budget": budget_rule(p, self.per_epoch, self.total, self.n_latents),
                           "training_rows": data.n_train, "aux_k": self.aux_k,
                           "device": str(self.device), "in_memory": data.in_memory,
                           "loss_curve": curve, "final_loss": curve[-1][1] if curve else None,
                           "plateau_drop": drop, "resumed_from_step":
                           None if self.resumed is None else len(self.resumed[0]),
                           "max_epochs": p.max_epochs,
                           "early_stop": None if self.stop is None else self.stop.summary()}
        if p.architecture == "batchtopk":
            result["train"]["threshold"] = float(sae.threshold.max())
        result["converged"] = flat or (self.stop is not None and self.stop.plateaued() is True)
        result["warnings"] = sae_warnings(result, p, data)
        return result

    def finish(self, ctx: Context, result: dict[str, Any]) -> dict[str, Any]:
        """Splice, save the weights, drop the checkpoint: the JSON-safe result."""
        sae = self.trainer.sae
        result["splice"] = self.analysis._splice(sae, ctx, self.layer)
        result["weights_path"] = result["config_path"] = result["saelens_path"] = None
        if ctx.out_dir is not None and self.p.save_weights:
            self.analysis._save(sae, ctx, self.layer, result, self.name)
        if self.ckpt is not None:
            self.ckpt.remove()
        return json_safe(result)


def train_together(fits: list[SAEFit], data: LayerRows, layer: str) -> None:
    """One pass of ``data``'s batch stream feeding every fit (module docstring)."""
    if all(f.done for f in fits):
        return
    start = min(f.trainer.n_steps for f in fits if not f.done)
    batches = data.batches(None)
    for _ in itertools.islice(batches, start):      # the batches every fit has already seen
        pass
    last = max(f.total for f in fits)
    t0 = time.perf_counter()
    with tqdm(total=last, initial=start, desc=f"sae {layer}", unit="step", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for step, batch in enumerate(batches, start):
            for f in fits:
                if f.wants(step):
                    f.feed(batch, t0)
            bar.update(1)
            if all(f.done for f in fits):
                break
