"""How long an SAE trains, at what lr, and whether the result can be trusted.

Usage::

    from mechray.analysis.sae_budget import budget_steps, auto_lr, loss_flat, sae_warnings

    total = budget_steps(params, steps_per_epoch)     # optimizer steps to run
    lr = params.lr or auto_lr(n_latents, total)
    converged, drop = loss_flat(per_step_losses)      # judged on the plateau before lr decay
    result["warnings"] = sae_warnings(result, params, data)

**Budget rule.**  ``steps`` if given; else ``epochs`` epochs over the stored training rows if
given; else ``max(min_steps, one epoch)`` — at least ``min_steps`` optimizer steps of
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
STEPS_PER_LATENT = 2   # the floor grows with the dictionary: 2 steps per latent beyond 500
DONE_FVU = 1e-3   # a training loss (fraction of variance unexplained) this low has nothing left


def min_steps(p: Any, n_latents: int) -> int:
    """The step floor: ``min_steps`` if set, else ``max(1000, 2 * n_latents)``."""
    return int(p.min_steps) if p.min_steps is not None else \
        max(MIN_STEPS, STEPS_PER_LATENT * int(n_latents))


def budget_steps(p: Any, steps_per_epoch: int, n_latents: int = 0) -> int:
    """Optimizer steps to run under the budget rule (see the module docstring)."""
    if p.steps is not None:
        return int(p.steps)
    if p.epochs is not None:
        return max(1, steps_per_epoch * p.epochs)
    return max(min_steps(p, n_latents), steps_per_epoch)


def budget_rule(p: Any, steps_per_epoch: int, total: int, n_latents: int = 0) -> str:
    """Which rule set ``total`` (recorded in the result)."""
    if p.steps is not None:
        return f"steps={p.steps}"
    if p.epochs is not None:
        return f"epochs={p.epochs} x {steps_per_epoch} steps"
    floor = min_steps(p, n_latents)
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
    """Plain-language reasons not to trust ``result`` (empty when none apply)."""
    out = []
    ev = result.get("explained_variance")
    if ev is not None and ev < 0:
        out.append(f"explained variance {ev:.3f} is negative: the SAE reconstructs the held-out "
                   f"rows worse than their mean does; it is not trained (raise min_steps/steps)")
    elif ev is not None and ev < LOW_EV:
        out.append(f"explained variance {ev:.3f} < {LOW_EV}: the SAE misses most of the "
                   f"variance; train longer or raise k / expansion_factor")
    dead = result.get("dead_fraction")
    if dead is not None and dead > DEAD_LIMIT:
        out.append(f"{dead:.0%} of latents are dead (> {DEAD_LIMIT:.0%}); train longer, raise "
                   f"aux_k or lower expansion_factor")
    train = result.get("train")
    if train:
        if train["steps"] < FEW_STEPS:
            out.append(f"only {train['steps']} optimizer steps (< {FEW_STEPS}); leave steps/"
                       f"epochs unset so the min_steps floor applies, or raise them")
        if result.get("converged") is False and train["steps"] >= FEW_STEPS:
            drop = train.get("plateau_drop")
            out.append(f"not converged: the loss still fell {drop:.1%} over steps 60-80% of "
                       f"the run; raise steps or min_steps" if drop is not None else
                       "not converged: the loss curve is not finite; lower lr")
        if p.max_rows is not None and data.n_train >= p.max_rows and \
                data.n_available > p.max_rows:
            out.append(f"max_rows={p.max_rows} cut the training rows to {data.n_train} of "
                       f"{data.n_available} stored; unset max_rows to use them all")
    k, l0 = result.get("k"), result.get("l0")
    arch = result.get("architecture")
    if arch in ("batchtopk", "jumprelu") and k and l0 is not None and abs(l0 - k) > 0.2 * k:
        out.append(f"held-out L0 {l0:.1f} is more than 20% from k={k}: the rows differ from the "
                   f"ones the threshold was calibrated on" if arch == "batchtopk" else
                   f"held-out L0 {l0:.1f} is more than 20% from the target k={k}: train longer "
                   f"or raise l0_coefficient")
    return out
