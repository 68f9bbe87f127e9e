"""When each latent of a dictionary over training steps is born, peaks and dies.

Usage::

    from mechray.analysis.lifetimes import lifetimes

    life = lifetimes(strength, [0, 100, 200], live, alive_fraction=0.3, absent_fraction=0.1)
    life["birth_step"][i], life["peak_step"][i], life["death_step"][i], life["kind"][i]
    life["born_late"]          # latents born after the first group, strongest first

``strength`` [latents, groups] is a non-negative size of each latent at each step group (the
crosscoder's ``decoder_norm x mean activation``).  Relative to the latent's own peak, a group is
*alive* (``>= alive_fraction``), *absent* (``< absent_fraction``) or in between.  Its **birth**
is the first alive group, counted only when every group before it is absent (``None`` when it
is alive in the first group: there from the start); its **death** the group after the last alive
one, counted only when every group after it is absent; its **peak** the group of the largest
strength.  ``kind``: ``shared`` (alive from the first group to the last), ``born`` (birth, no
death), ``died`` (death, no birth), ``transient`` (both), ``intermittent`` (absent between two
alive groups), ``unstable`` (neither absent nor alive before its first or after its last alive
group: too noisy to date) or ``rare`` (not ``live``: fires too seldom to judge).  Only
``born``/``transient`` latents have a birth step and ``died``/``transient`` a death step.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

KINDS = ("shared", "born", "died", "transient", "intermittent", "unstable", "rare")


def lifetimes(strength: np.ndarray, labels: list[int], live: np.ndarray,
              alive_fraction: float, absent_fraction: float) -> dict[str, Any]:
    """Birth, peak and death per latent (see the module docstring)."""
    n, g = strength.shape
    peak = strength.max(1) if g else np.zeros(n)
    rel = np.divide(strength, peak[:, None], out=np.zeros_like(strength),
                    where=peak[:, None] > 0)
    state = (rel >= alive_fraction).astype(int) * 2 + \
        ((rel >= absent_fraction) & (rel < alive_fraction)).astype(int)
    births: list[Optional[int]] = []
    deaths: list[Optional[int]] = []
    kinds: list[str] = []
    peaks: list[Optional[int]] = []
    for i in range(n):
        on = np.flatnonzero(state[i] == 2)
        births.append(None)
        deaths.append(None)
        peaks.append(labels[int(np.argmax(strength[i]))] if live[i] and len(on) else None)
        if not live[i] or len(on) == 0:
            kinds.append("rare")
            continue
        first, last = int(on[0]), int(on[-1])
        if (state[i, first:last + 1] == 0).any():
            kinds.append("intermittent")
        elif state[i, :first].any() or state[i, last + 1:].any():
            kinds.append("unstable")
        else:
            births[i] = labels[first] if first > 0 else None
            deaths[i] = labels[last + 1] if last < g - 1 else None
            kinds.append("shared" if births[i] is None and deaths[i] is None else
                         "born" if deaths[i] is None else "died" if births[i] is None else
                         "transient")
    born_late = [i for i in np.argsort(-peak, kind="stable").tolist() if births[i] is not None]
    counts = {k: kinds.count(k) for k in KINDS}
    return {"relative_strength": np.round(rel, 4).tolist(),
            "birth_step": births, "death_step": deaths, "peak_step": peaks, "kind": kinds,
            "counts": counts, "born_late": born_late,
            "births_per_step": {str(s): sum(b == s for b in births) for s in labels[1:]},
            "deaths_per_step": {str(s): sum(d == s for d in deaths) for s in labels[1:]}}
