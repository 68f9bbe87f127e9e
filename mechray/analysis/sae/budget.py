"""How long an SAE trains, at what lr, and whether the result can be trusted.

Usage::

    from mechray.analysis.sae.budget import budget_steps, auto_lr, loss_flat, sae_warnings

    total = budget_steps(params, steps_per_epoch)     # optimizer steps to run
    lr = params.lr or auto_lr(n_latents, total)
    converged, drop = loss_flat(per_step_losses)      # judged on the plateau before lr decay
    result["warnings"] = sae_warnings(result, params, data)

**Budget rule.**  ``steps`` if given; else ``epochs`` epochs over the stored training rows if
given; else ``min(max(min_steps, one epoch), max_epochs epochs)`` (``max_epochs`` 50) — at
least ``min_steps`` optimizer steps of
``batch_size`` (1,024) rows (``min_steps`` unset: ``max(1000, 2 * n_latents)``, two steps
per latent and never fewer than 1,000, i.e. at least a million rows seen), as many epochs over a
small store as that takes, and one full pass over a large one.  Why it grows with the
dictionary: at 2,048 latents (mechray's planted 256x2048x16) 1,000 steps left the loss falling
11.6% over steps 60-80% and recovered 0.961 of the dictionary, 2,000 steps 0.979.  Why two per
latent: on rows drawn by SAELens' own generator (``mechray.testing.saelens_planted_dictionary``,
a varying number of directions per row) one step per latent still left 128x1024x16 unconverged
(loss -14% over steps 60-80%; recovered 0.959 TopK, 0.883 BatchTopK) and 256x2048x16 too
(0.960 / 0.954); two per latent converge and recover 0.977 / 0.952 and 0.967 / 0.965, in less
CPU time than SAELens at its defaults on the same rows (211 s against 273 s at 256x2048x16).  A
store of 60,000 rows therefore gets 17 epochs or more instead of the 14 steps one epoch of
4,096-row batches gave.  Why a floor in steps: on planted dictionaries
(``benchmarks/sae_vs_saelens.py``) recovery and explained variance fall apart below ~200 steps
whatever the store size; the floor costs seconds to minutes on a CPU for d <= 512.

**The cap in epochs** (``max_epochs``, default 50; ``None`` lifts it): the floor is counted in
steps, so a small store was passed over again and again: MiniLM's ``encoder.layer.3`` on 300
sentences (5,599 stored rows, 3,072 latents) got 6,144 steps, 1,024 epochs, 3,273 s (loaded machine), and
fitted those rows (EV 0.977) far better than new sentences (0.68).  Repeating the same rows adds
little that generalises: on 300 distinct sentences (5,340 training rows, 3,072 latents) held-out
EV was 0.951 after 34 epochs, 0.954 after 50 and 0.959 after 67 (EV on rows of new sentences
0.949 / 0.953 / 0.958), i.e. +0.005 per 17 more epochs, while the gap to the training rows kept
growing (0.017 / 0.021 / 0.023).  50 epochs is ~300 steps there (about 2 CPU minutes); a store
of 40,000+ rows per 1,024 latents is not capped (its floor is under 50 epochs).  Small stores
also get the store-size and memorisation warnings below.

**Early stop** (``early_stop``; default on for the automatic budget, off when ``steps`` or
``epochs`` is given): every ``eval_every`` steps (default ``total // 20``, at least 5) the held-
out fraction of variance unexplained (FVU, ``1 - EV``) is measured; when it has not improved on
its best by ``EARLY_MIN_GAIN`` (0.5%, relative) for ``EARLY_PATIENCE`` (3) evaluations in a row,
or when it is more than ``EARLY_RISE`` (5%) above its best, training stops and the weights of
the best evaluation are restored (it never stops before ``max(warmup, total // 5, 200)`` steps,
200 being the floor below which planted dictionaries are not recovered). On the planted 64x256x5
dictionary of ``tests/analysis/test_sae.py`` the held-out FVU is flat from step ~90 (at the
data's noise ceiling), so the fit stops at ~210 of 600 steps. The held-out rows then also chose
the stopping point, a small optimistic bias in their EV (one of ~20 checkpoints);
``benchmarks/sae_minilm.py`` checks it against rows of new sentences. It watches rows kept in
memory only (a streamed store is read once per epoch and gets no early stop); a fit resumed
from a checkpoint starts watching afresh at the resumed step. ``converged`` is
true when the held-out FVU stopped improving (an early stop, or held-out EV gaining less than
0.01 from the evaluation at 60% of the run to the one at 80%), or when the training loss did
(:func:`loss_flat`): on a small store the training loss keeps falling as the SAE fits its rows,
which is memorisation, not progress.

**Warnings** beyond the usual (:func:`sae_warnings`): *memorisation*, when EV on training rows
(as many as are held out) exceeds held-out EV by more than ``MEMORISE_GAP`` (0.05); a *small
store*, when there are fewer training rows than latents (each latent could own a row).  Both
suggest an ``expansion_factor`` with at most half the latents and at most one per training row.

**Automatic lr** ``min(1e-2, 5e-3 * sqrt(4096 / n_latents) * sqrt(min(1, 5000 / steps)))``:
short runs need a large step (5e-3 at 4,096 latents and <= 5,000 steps, 1e-2 at <= 1,024
latents; the old ``2e-4 / sqrt(n/16384)``, tuned for LLM-scale runs, is 10-25x too small
there), and the lr falls as ``1/sqrt(steps)`` for longer budgets, meeting Gao et al.'s long-run
value (2e-4 at 16,384 latents) near 10^6 steps.  Measured on a planted 1,024-direction
dictionary in d = 128 (1,024 latents, k = 16, 600 steps): lr 4e-3 recovers 0.60 of it, 8e-3
0.94, 1.6e-2 0.95.  The schedule is linear warmup (5% of the steps,
at most 1,000), constant, then linear decay to 0 over the last 20%.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

LOW_EV, DEAD_LIMIT, FEW_STEPS, FLAT_DROP, MIN_STEPS = 0.5, 0.10, 200, 0.05, 1000
MAX_EPOCHS = 50       # the automatic budget's cap in epochs (module docstring)
MEMORISE_GAP = 0.05   # training EV this far above held-out EV: the SAE fits rows, not features
EARLY_PATIENCE, EARLY_MIN_GAIN, EARLY_RISE = 3, 0.005, 0.05
FLAT_EV = 0.01        # held-out EV gaining less than this over steps 60-80%: converged
STEPS_PER_LATENT = 2   # the floor grows with the dictionary: 2 steps per latent beyond 500
DONE_FVU = 1e-3   # a training loss (fraction of variance unexplained) this low has nothing left


def min_steps(p: Any, n_latents: int) -> int:
    """The step floor: ``min_steps`` if set, else ``max(1000, 2 * n_latents)``."""
    return int(p.min_steps) if p.min_steps is not None else \
        max(MIN_STEPS, STEPS_PER_LATENT * int(n_latents))


def max_epochs(p: Any) -> Optional[int]:
    """The cap in epochs of the automatic budget (``None``: no cap)."""
    return getattr(p, "max_epochs", MAX_EPOCHS)


def budget_steps(p: Any, steps_per_epoch: int, n_latents: int = 0) -> int:
    """Optimizer steps to run under the budget rule (see the module docstring)."""
    if p.steps is not None:
        return int(p.steps)
    if p.epochs is not None:
        return max(1, steps_per_epoch * p.epochs)
    total = max(min_steps(p, n_latents), steps_per_epoch)
    cap = max_epochs(p)
    return total if cap is None else min(total, max(1, cap * steps_per_epoch))


def early_stopping(p: Any) -> bool:
    """Is the held-out early stop on?  ``early_stop`` if set, else only for the automatic
    budget (a given ``steps`` or ``epochs`` is run in full)."""
    flag = getattr(p, "early_stop", None)
    return (p.steps is None and p.epochs is None) if flag is None else bool(flag)


def budget_rule(p: Any, steps_per_epoch: int, total: int, n_latents: int = 0) -> str:
    """Which rule set ``total`` (recorded in the result)."""
    if p.steps is not None:
        return f"steps={p.steps}"
    if p.epochs is not None:
        return f"epochs={p.epochs} x {steps_per_epoch} steps"
    floor = min_steps(p, n_latents)
    cap = max_epochs(p)
    if cap is not None and total < max(floor, steps_per_epoch):
        return (f"max_epochs={cap} x {steps_per_epoch} steps (a small store: the floor "
                f"min_steps={floor} would be {floor / max(steps_per_epoch, 1):.0f} epochs)")
    if total == steps_per_epoch:
        return f"one epoch ({steps_per_epoch} steps >= min_steps={floor})"
    return (f"min_steps={floor} ({total / max(steps_per_epoch, 1):.1f} epochs of "
            f"{steps_per_epoch} steps)")


def auto_lr(n_latents: int, steps: int) -> float:
    """Adam lr for ``n_latents`` latents trained for ``steps`` steps (module docstring)."""
    return min(1e-2, 5e-3 * math.sqrt(4096 / n_latents) * math.sqrt(min(1.0, 5000 / steps)))


def loss_flat(losses: torch.Tensor) -> tuple[bool, Optional[float]]:
    """``(converged, drop)``: did the loss stop falling before the lr decay?

    ``drop`` is the relative fall of the mean loss from steps [40%, 60%) to [60%, 80%) of the
    run, the last part trained at full lr (the decay over the final 20% lowers the loss by
    annealing whether or not training had converged, so it is left out).  Converged means
    ``drop < 5%`` and at least 200 steps, or a loss (the trainer's FVU) already under
    :data:`DONE_FVU` there: a near-perfect fit whose tiny loss still halves is not unfinished.
    """
    n = len(losses)
    if n < 10:
        return False, None
    a = losses[int(0.4 * n): int(0.6 * n)].mean().item()
    b = losses[int(0.6 * n): int(0.8 * n)].mean().item()
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return False, None
    drop = (a - b) / a
    return bool((drop < FLAT_DROP or b < DONE_FVU) and n >= FEW_STEPS), round(drop, 4)


def sae_warnings(result: dict[str, Any], p: Any, data: Any) -> list[str]:
    """Plain-language reasons not to trust ``result`` (empty when none apply).  A pretrained SAE
    (``result["trained"] is False``) is spoken of as the SAE it is, not as a training run."""
    out = []
    trained = result.get("trained") is not False
    ev = result.get("explained_variance")
    if ev is not None and ev < 0:
        out.append(f"explained variance {ev:.3f} is negative: the SAE reconstructs the held-out "
                   f"rows worse than their mean does; it is not trained (raise min_steps/steps)"
                   if trained else
                   f"explained variance {ev:.3f} is negative: this pretrained SAE reconstructs "
                   f"the held-out rows worse than their mean does; check that it was trained on "
                   f"this layer of this model (hook_name, normalisation)")
    elif ev is not None and ev < LOW_EV:
        out.append(f"explained variance {ev:.3f} < {LOW_EV}: the SAE misses most of the "
                   f"variance; train longer or raise k / expansion_factor" if trained else
                   f"explained variance {ev:.3f} < {LOW_EV}: this pretrained SAE misses most "
                   f"of the variance of these rows; it may be for another layer or model")
    dead = result.get("dead_fraction")
    if dead is not None and dead > DEAD_LIMIT:
        out.append(f"{dead:.0%} of latents are dead (> {DEAD_LIMIT:.0%}); train longer, raise "
                   f"aux_k or lower expansion_factor" if trained else
                   f"{dead:.0%} of this pretrained SAE's latents never fire on the held-out "
                   f"rows (> {DEAD_LIMIT:.0%}); they may fire on other text, or be dead")
    train = result.get("train")
    if train:
        capped = str(train.get("budget", "")).startswith("max_epochs=")
        if train["steps"] < FEW_STEPS:
            out.append(f"only {train['steps']} optimizer steps (< {FEW_STEPS}): "
                       f"max_epochs={max_epochs(p)} epochs of this small store ({data.n_train} "
                       f"training rows); capture more rows, or raise max_epochs at the risk of "
                       f"memorising them"
                       if capped else
                       f"only {train['steps']} optimizer steps (< {FEW_STEPS}); leave steps/"
                       f"epochs unset so the min_steps floor applies, or raise them")
        if result.get("converged") is False and train["steps"] >= FEW_STEPS:
            drop = train.get("plateau_drop")
            out.append("not converged: the loss curve is not finite; lower lr" if drop is None
                       else f"not converged: the held-out loss still fell over steps 60-80% of "
                       f"the run when max_epochs={max_epochs(p)} stopped it on this small store; "
                       f"capture more rows, or raise max_epochs" if capped else
                       f"not converged: the loss still fell {drop:.1%} over steps 60-80% of "
                       f"the run; raise steps or min_steps")
        if p.max_rows is not None and data.n_train >= p.max_rows and \
                data.n_available > p.max_rows:
            out.append(f"max_rows={p.max_rows} cut the training rows to {data.n_train} of "
                       f"{data.n_available} stored; unset max_rows to use them all")
        gap = result.get("train_explained_variance")
        if gap is not None and ev is not None and gap - ev > MEMORISE_GAP:
            out.append(f"memorising: explained variance {gap:.3f} on training rows but "
                       f"{ev:.3f} on held-out rows (gap > {MEMORISE_GAP}); the SAE fits these "
                       f"rows rather than features of the layer: capture more rows, or "
                       f"{_smaller(result, data)}")
        n_lat = result.get("n_latents") or 0
        if n_lat > data.n_train:
            out.append(f"small store: {data.n_train} training rows for {n_lat} latents (fewer "
                       f"rows than latents); {_smaller(result, data)}, or capture more rows")
    k, l0 = result.get("k"), result.get("l0")
    arch = result.get("architecture")
    if arch in ("batchtopk", "jumprelu") and k and l0 is not None and abs(l0 - k) > 0.2 * k:
        out.append(f"held-out L0 {l0:.1f} is more than 20% from k={k}: the rows differ from the "
                   f"ones the threshold was calibrated on" if arch == "batchtopk" else
                   f"held-out L0 {l0:.1f} is more than 20% from the target k={k}: train longer "
                   f"or raise l0_coefficient")
    return out


@torch.no_grad()
def fvu(sae: Any, x: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of variance unexplained of rows ``x`` by ``sae`` (``1 - EV``), in eval mode."""
    was = sae.training
    x = x.to(next(sae.parameters()).device, torch.float32)
    sae.eval()
    err = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        err += (xb - sae(xb)).pow(2).sum().item()
    sae.train(was)
    return err / max((x - x.mean(0)).pow(2).sum().item(), 1e-30)


class EarlyStop:
    """Stops training when the held-out FVU stops improving or rises (module docstring).

    Usage::

        stop = EarlyStop(held_out_rows, every=15, start=60)
        for batch in batches:
            trainer.step(batch)
            if stop.check(sae, trainer.n_steps):
                break
        stop.restore(sae)            # the weights of the best evaluation
        stop.summary()               # what was watched, when and why it stopped
    """

    def __init__(self, rows: torch.Tensor, every: int, start: int,
                 patience: int = EARLY_PATIENCE, min_gain: float = EARLY_MIN_GAIN,
                 rise: float = EARLY_RISE):
        self.rows, self.every, self.start = rows, max(1, every), start
        self.patience, self.min_gain, self.rise = patience, min_gain, rise
        self.best, self.best_step, self.bad = math.inf, 0, 0
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.curve: list[list[float]] = []
        self.stopped_at: Optional[int] = None
        self.reason: Optional[str] = None

    def check(self, sae: Any, step: int) -> bool:
        """Measure at every ``every``-th step; ``True`` when training should stop."""
        if step % self.every:
            return False
        value = fvu(sae, self.rows)
        self.curve.append([step, round(value, 6)])
        if value < self.best * (1 - self.min_gain):
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
            return False
        if value < self.best:      # better, but by less than min_gain: keep the weights
            self.best, self.best_step = value, step
            self.best_state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        self.bad += 1
        if step < self.start:
            return False
        if value > self.best * (1 + self.rise):
            self.reason = (f"held-out FVU rose to {value:.4f}, more than {self.rise:.0%} above "
                           f"its best {self.best:.4f} (step {self.best_step})")
        elif self.bad >= self.patience:
            self.reason = (f"held-out FVU improved by less than {self.min_gain:.1%} over "
                           f"{self.patience} evaluations ({self.patience * self.every} steps)")
        if self.reason is not None:
            self.stopped_at = step
        return self.reason is not None

    def restore(self, sae: Any) -> None:
        """Load the weights of the best evaluation (when training stopped early)."""
        if self.stopped_at is not None and self.best_state is not None:
            sae.load_state_dict(self.best_state)

    def plateaued(self) -> Optional[bool]:
        """Held-out EV rose by less than ``FLAT_EV`` (0.01) from the evaluation at 60% of the
        run to the one at 80% (``None`` with fewer than 5 evaluations); an early stop counts as
        plateaued."""
        if self.stopped_at is not None:
            return True
        if len(self.curve) < 5:
            return None
        n = len(self.curve)
        a, b = self.curve[int(0.6 * (n - 1))][1], self.curve[int(0.8 * (n - 1))][1]
        return a - b < FLAT_EV

    def summary(self) -> dict[str, Any]:
        return {"every": self.every, "patience": self.patience, "min_gain": self.min_gain,
                "stopped_at": self.stopped_at, "best_step": self.best_step,
                "best_heldout_fvu": None if math.isinf(self.best) else round(self.best, 6),
                "reason": self.reason, "heldout_fvu_curve": self.curve}


def _smaller(result: dict[str, Any], data: Any) -> str:
    """The advice for a dictionary too big for its rows: half the latents, and at most one latent
    per training row."""
    d = int(result.get("d_in") or data.d)
    fit = min(data.n_train, max(1, int(result.get("n_latents") or 0) // 2)) // max(d, 1)
    return f"lower expansion_factor to {fit} (n_latents {fit * d}) or less" if fit >= 1 \
        else f"set n_latents to {max(1, data.n_train // 2)} or fewer"
