"""A store whose active dictionary changes at known training steps (the crosscoder's planted test).

``write_planted(path, paired=True)`` captures, through a real :class:`ActivationSampler`, the
output of a module that maps an input index to its activation at the current step: rows are
sparse sums of ``ATOMS`` unit directions in ``D`` dimensions (``ACTIVE`` per row, magnitudes in
[0.5, 2]), where atoms ``LATE`` exist only from step ``BIRTH`` on and atoms ``DYING`` only
before step ``DEATH``.  Every direction drifts a little across steps and the activation scale
grows 1 -> 1.5, as a model's do while it trains.  ``paired=True``: the same ``INPUTS`` inputs at
every saved step, saved with their inputs (a probe batch); ``paired=False``: fresh rows each
step, no inputs saved.
"""

from __future__ import annotations

import torch
from torch import nn

from mechray.capture.sampler import ActivationSampler
from mechray.storage.reader import ShardStore

D, ATOMS, ACTIVE, INPUTS = 24, 32, 3, 1500
STEPS = [0, 100, 200, 300, 400, 500, 600, 700]
BIRTH, DEATH = 400, 500
LATE, DYING = list(range(0, 4)), list(range(4, 8))


def atoms_at(step: int, seed: int = 0) -> torch.Tensor:
    """[ATOMS, D] unit directions at ``step`` (slow drift)."""
    g = torch.Generator().manual_seed(90_001 + seed)   # not the analyses' init seeds
    base = torch.randn(ATOMS, D, generator=g)
    drift = torch.randn(ATOMS, D, generator=g)
    a = base / base.norm(dim=1, keepdim=True) + 0.15 * (step / STEPS[-1]) * \
        drift / drift.norm(dim=1, keepdim=True)
    return a / a.norm(dim=1, keepdim=True)


def alive(step: int) -> torch.Tensor:
    on = torch.ones(ATOMS, dtype=torch.bool)
    if step < BIRTH:
        on[LATE] = False
    if step >= DEATH:
        on[DYING] = False
    return on


def codes(n: int, on: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[n, ATOMS]: ACTIVE atoms among ``on`` per row, magnitudes in [0.5, 2]."""
    score = torch.rand(n, ATOMS, generator=g).masked_fill(~on, -1.0)
    idx = score.topk(ACTIVE, dim=1).indices
    return torch.zeros(n, ATOMS).scatter(1, idx, 0.5 + 1.5 * torch.rand(n, ACTIVE, generator=g))


class Lookup(nn.Module):
    """``forward(index)`` -> the activation table's rows (the "model" at the current step)."""

    def __init__(self):
        super().__init__()
        self.src = nn.Identity()
        self.table = torch.zeros(0, D)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.src(self.table[index])


def write_planted(path, paired: bool = True, seed: int = 0) -> ShardStore:
    g = torch.Generator().manual_seed(70_001 + seed)
    fixed = codes(INPUTS, torch.ones(ATOMS, dtype=torch.bool), g)   # the probe inputs' codes
    model = Lookup()
    sampler = ActivationSampler(layers=["src"], save_dir=str(path), use_ray=False, verbose=False,
                                max_activations_per_shard=INPUTS)
    sampler.register_hooks(model, inputs=paired)
    for step in STEPS:
        on = alive(step)
        c = fixed * on if paired else codes(INPUTS, on, g)
        scale = 1.0 + 0.5 * step / STEPS[-1]
        model.table = scale * (c @ atoms_at(step, seed) + 0.02 * torch.randn(INPUTS, D,
                                                                            generator=g))
        sampler.current_step = step
        with torch.no_grad():
            model(torch.arange(INPUTS))
        sampler.save_activations(step)
    sampler.close()
    return ShardStore(path)


def match(directions: torch.Tensor, step: int, threshold: float = 0.9,
          seed: int = 0) -> list[int]:
    """Per direction (rows of [m, D], raw units), the planted atom it points at (cos >= threshold)
    at ``step``, or -1."""
    a = atoms_at(step, seed)
    u = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = u @ a.T
    best = cos.max(1)
    return [int(i) if v >= threshold else -1 for v, i in zip(best.values, best.indices)]


def score(events: list[tuple[int, torch.Tensor]], planted: list[int], truth: int,
          threshold: float = 0.9) -> dict:
    """Reported events ``(step, the latent's decoder directions [m, D] where it is alive)``
    against planted atoms born (or dying) at ``truth`` (an event points at an atom when one of
    its directions does): ``found`` planted atoms with an event pointing at them within one
    saved step of the truth, ``errors`` (saved steps between each such event and the truth), ``false`` events
    that point at no planted atom of that kind or are more than one saved step off."""
    found, errors, false = set(), [], 0
    for step, directions in events:
        atoms = set(match(directions, STEPS[max(0, STEPS.index(truth) - 1)], threshold))
        atom = min(atoms & set(planted), default=-1)
        off = abs(STEPS.index(step) - STEPS.index(truth))
        if atom in planted and off <= 1:
            found.add(atom)
            errors.append(off)
        else:
            false += 1
    return {"found": sorted(found), "errors": errors, "false": false}
