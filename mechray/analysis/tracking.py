"""``sae_tracking``: one SAE per step group, latents matched between consecutive groups.

Usage::

    from mechray.analysis import get_analysis, Context

    tr = get_analysis("sae_tracking", {"k": 8, "expansion_factor": 4})
    result = tr.fit(Context(store=ShardStore("./mechint_cache"), out_dir=Path("results")), "popt")
    result["births"]        # [{"step": 400, "latent": 17, "chain": 41}, ...]
    result["deaths"], result["splits"], result["merges"]
    result["chains"][c]     # [[group, latent], ...]: one feature followed across groups
    result["birth_step"][c], result["death_step"][c], result["kind"][c]   # per chain

The cheap alternative to ``crosscoder``: each step group's rows (grouped as in
:mod:`mechray.analysis.step_rows`; scaled to mean norm ``sqrt(d)`` per group) train their own
TopK SAE (:class:`~mechray.analysis.sae.model.SparseAutoencoder`, the ``sae`` budget, lr and
verdict per group).  Latents that fire on at least ``min_frequency`` and ``min_rows`` of their
group's rows are *live*; the live latents of consecutive groups are matched one to one by the
cosine of their decoder directions (Hungarian assignment, ``scipy.optimize.linear_sum_assignment``
maximising the summed cosine), a match counting when its cosine is ``>= match_threshold``.

- **chain**: a latent followed through its matches; it ends where its latent has no match.
- **birth** at group ``g``: a live latent with no live latent of group ``g - 1`` within
  ``match_threshold`` (nothing like it existed).  A latent without a match whose direction *is*
  close to a latent of ``g - 1`` (that one matched another) is a **split** of it, not a birth.
- **death** at group ``g``: a live latent of ``g - 1`` with nothing within ``match_threshold``
  among the live latents of ``g``; one without a match that is close to a latent of ``g`` (matched
  to another) **merged** into it.
- **flicker**: a chain seen in one group only (with more than two groups): a latent of one SAE
  that neither neighbour has.  Its birth and death are not counted (``flickers`` lists them);
  a latent born in the last group is such a chain too, so a birth at the last saved step cannot
  be confirmed by tracking.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from mechray._util import json_safe as _json_safe
from mechray._util import safe_name
from mechray.analysis.base import (
    JSON_NUMBER,
    Analysis,
    Context,
    Cost,
    Skip,
    Workload,
    register,
)
from mechray.analysis.crosscoder import (
    StepDictParams,
    _check_sizes,
    birth_lines,
    budget_of,
    timeline,
)
from mechray.analysis.sae.analysis import _device
from mechray.analysis.sae.budget import auto_lr, budget_rule, budget_steps, loss_flat, sae_warnings
from mechray.analysis.sae.evaluate import evaluate
from mechray.analysis.sae.model import SparseAutoencoder, save_sae
from mechray.analysis.sae.params import MAX_LATENTS
from mechray.analysis.sae.train import SAETrainer
from mechray.analysis.step_rows import StepRows

log = logging.getLogger(__name__)
MIN_CHAIN = 2          # groups a chain must span for its birth or death to count


class TrackingParams(StepDictParams):
    """``sae_tracking``'s parameters: :class:`StepDictParams` and the match threshold."""

    aux_k: Optional[int] = Field(None, ge=0, le=MAX_LATENTS,
                                 description="AuxK latents per SAE; None: d // 2")
    match_threshold: float = Field(0.7, gt=0.0, le=1.0,
                                   description="decoder cosine for two latents to be the same "
                                               "feature")


@register
class SAETracking(Analysis):
    """One SAE per step group, latents matched across groups (kind ``fit``): births, deaths."""

    name = "sae_tracking"
    kind = "fit"
    Params = TrackingParams
    summary = "an SAE per saved step, latents matched by decoder cosine: births, deaths, splits"
    columns = (("steps", lambda r: f"{r['steps'][0]}–{r['steps'][-1]} ({len(r['steps'])})"),
               ("explained variance", lambda r: min(r["explained_variance"])),
               ("chains", lambda r: len(r["chains"])),
               ("births", lambda r: len(r["births"])), ("deaths", lambda r: len(r["deaths"])),
               ("splits", lambda r: len(r["splits"])), ("merges", lambda r: len(r["merges"])),
               ("converged", lambda r: r["converged"]))
    plot_file = "sae_tracking_timeline.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        return timeline(per, plt, "relative_frequency",
                        "SAE tracking: chain's firing frequency / its peak")

    @staticmethod
    def report_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return birth_lines(rows)

    @classmethod
    def answer_bytes(cls, p: TrackingParams, w: Workload) -> float:
        latents = float(p.n_latents or p.expansion_factor * w.d)
        groups = float(min(w.steps, p.step_groups or w.steps))
        return JSON_NUMBER * latents * groups * 12 + 65536

    @classmethod
    def cost(cls, p: TrackingParams, w: Workload) -> Cost:
        n, d, latents, groups, size, steps = budget_of(p, w)
        return Cost(groups * 6 * steps * size * latents * d + 2 * n * latents * d +
                    groups * latents ** 3,
                    n * d * 4 * 2 + latents * d * 4 * 5 + size * latents * 4 * 4)

    def fit(self, ctx: Context, layer: str) -> dict[str, Any]:
        p: TrackingParams = self.params
        if ctx.store is None:
            raise Skip("sae_tracking needs stored shards of the layer at several saved steps")
        device = _device(p.device)
        data = StepRows.read(ctx.store, layer, p.training_steps, p.step_groups, "none",
                             p.max_rows)
        G, d = len(data.groups), data.d
        n_latents = p.n_latents or p.expansion_factor * d
        _check_sizes(p, d, 1, n_latents)
        train_idx, held_idx = data.split(p.holdout_fraction, p.seed)
        per_group: list[dict[str, Any]] = []
        directions, live, freqs = [], [], []
        warnings: list[str] = []
        saes = []
        for g in range(G):
            x = data.x[g]
            scale = math.sqrt(d) / max(float(x.norm(dim=1).mean()), 1e-12) \
                if p.normalize_input else 1.0
            x = (x * scale).to(device)
            sae, info = self._train(x[train_idx[g].to(device)], g, n_latents, device, layer,
                                    data.labels[g])
            held = x[held_idx[g].to(device)]
            window = min(p.dead_steps_threshold, info["steps"])
            m = evaluate(sae, held, info.pop("dead") >= window, p.batch_size)
            fired = torch.zeros(n_latents, device=device)
            with torch.no_grad():
                for i in range(0, len(x), 4096):
                    fired += (sae.encode(x[i:i + 4096]) > 0).sum(0)
            freq = (fired / max(len(x), 1)).cpu().numpy()
            freqs.append(freq)
            live.append((freq >= max(p.min_frequency, 1e-12)) & (fired.cpu().numpy() >= p.min_rows))
            directions.append(torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).cpu()
                              .numpy())
            row = {"step": data.labels[g], "steps": data.groups[g],
                   "explained_variance": m["explained_variance"], "l0": m["l0"],
                   "dead_fraction": m["dead_fraction"], "live": int(live[-1].sum()),
                   "input_scale": scale, "train": info}
            row["converged"] = info["converged"]
            for w in sae_warnings({**m, "train": info, "converged": info["converged"],
                                   "k": p.k, "architecture": "topk"}, p,
                                  _Count(len(train_idx[g]), len(x))):
                warnings.append(f"step {data.labels[g]}: {w}")
            per_group.append(row)
            saes.append((sae, scale))
        result = track(directions, live, freqs, data.labels, p.match_threshold)
        result.update(
            steps=data.labels, groups=data.groups, per_step=per_group,
            explained_variance=[r["explained_variance"] for r in per_group],
            converged=all(r["converged"] for r in per_group), warnings=warnings,
            n_latents=n_latents, k=p.k, d_in=d, match_threshold=p.match_threshold,
            weights_paths=None)
        if ctx.out_dir is not None and p.save_weights:
            result["weights_paths"] = []
            for label, (sae, scale) in zip(data.labels, saes):
                sae.input_scale.mul_(scale)          # folded: the file acts on raw rows
                rel = f"sae_tracking/{safe_name(layer)}/step_{label}.safetensors"
                save_sae(sae, ctx.out_dir / rel, {"layer": layer, "step": label})
                result["weights_paths"].append(rel)
        log.info("sae_tracking %s (%d groups): %d chains, %d births, %d deaths, %d splits, "
                 "%d merges", layer, G, len(result["chains"]), len(result["births"]),
                 len(result["deaths"]), len(result["splits"]), len(result["merges"]))
        return _json_safe(result)

    def _train(self, x: torch.Tensor, g: int, n_latents: int, device: torch.device, layer: str,
               label: int) -> tuple[SparseAutoencoder, dict[str, Any]]:
        """One group's SAE under the ``sae`` budget rule."""
        p: TrackingParams = self.params
        per_epoch = max(1, math.ceil(len(x) / p.batch_size))
        total = budget_steps(p, per_epoch, n_latents)
        lr = p.lr or auto_lr(n_latents, total)
        warmup = p.warmup_steps if p.warmup_steps is not None else min(1000, total // 20)
        gen = torch.Generator().manual_seed(p.seed * 7919 + g)
        sae = SparseAutoencoder(x.shape[1], n_latents, "topk", p.k, generator=gen).to(device)
        sae.init_from_data(x[:65536], True, "mean")
        aux_k = min(x.shape[1] // 2 if p.aux_k is None else p.aux_k, n_latents)
        trainer = SAETrainer(sae, lr, 0.0, aux_k, p.aux_coefficient, p.dead_steps_threshold,
                             total_steps=total, warmup_steps=warmup)
        losses = torch.empty(total)
        t0 = time.perf_counter()
        step = 0
        with tqdm(total=total, desc=f"sae_tracking {layer} step {label}", unit="step",
                  leave=False, disable=not sys.stderr.isatty()) as bar:
            for epoch in range(10 ** 9):
                order = torch.randperm(len(x), generator=torch.Generator().manual_seed(
                    p.seed + 7919 * (epoch + 1))).to(device)
                for i in range(0, len(order), p.batch_size):
                    if step >= total:
                        break
                    losses[step] = trainer.step(x[order[i:i + p.batch_size]]).item()
                    step += 1
                    bar.update(1)
                if step >= total:
                    break
        sae.eval()
        flat, drop = loss_flat(losses)
        return sae, {"steps": total, "rows": len(x), "seconds": time.perf_counter() - t0,
                     "lr": lr, "budget": budget_rule(p, per_epoch, total, n_latents),
                     "final_loss": float(losses[-1]), "plateau_drop": drop, "converged": flat,
                     "dead": trainer.steps_since_fired.clone()}


class _Count:
    """What :func:`sae_warnings` reads of the training data."""

    def __init__(self, n_train: int, n_available: int):
        self.n_train, self.n_available = n_train, n_available


def track(directions: list[np.ndarray], live: list[np.ndarray], freqs: list[np.ndarray],
          labels: list[int], threshold: float) -> dict[str, Any]:
    """Chains, births, deaths, splits and merges from per-group unit decoder directions
    (``directions[g]`` [n, d]) and live masks (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    G = len(directions)
    chain_of: list[dict[int, int]] = [{} for _ in range(G)]
    chains: list[list[list[int]]] = []
    births, deaths, splits, merges, matched_cos = [], [], [], [], []
    for j in np.flatnonzero(live[0]).tolist():
        chain_of[0][j] = len(chains)
        chains.append([[0, j]])
    for g in range(1, G):
        prev, cur = np.flatnonzero(live[g - 1]), np.flatnonzero(live[g])
        cos = directions[g - 1][prev] @ directions[g][cur].T if len(prev) and len(cur) else \
            np.zeros((len(prev), len(cur)))
        rows, cols = linear_sum_assignment(-cos) if cos.size else ([], [])
        link = {int(cur[c]): int(prev[r]) for r, c in zip(rows, cols) if cos[r, c] >= threshold}
        matched_cos.append(float(np.mean([cos[r, c] for r, c in zip(rows, cols)
                                          if cos[r, c] >= threshold] or [np.nan])))
        linked_prev = set(link.values())
        for c, j in enumerate(cur.tolist()):
            if j in link:
                chain_of[g][j] = chain_of[g - 1][link[j]]
                chains[chain_of[g][j]].append([g, j])
                continue
            chain_of[g][j] = len(chains)
            chains.append([[g, j]])
            best = int(np.argmax(cos[:, c])) if len(prev) else -1
            if best >= 0 and cos[best, c] >= threshold:
                splits.append({"step": labels[g], "from": int(prev[best]), "into": j,
                               "chain": chain_of[g][j], "cosine": round(float(cos[best, c]), 4)})
            else:
                births.append({"step": labels[g], "latent": j, "chain": chain_of[g][j]})
        for r, i in enumerate(prev.tolist()):
            if i in linked_prev:
                continue
            best = int(np.argmax(cos[r])) if len(cur) else -1
            if best >= 0 and cos[r, best] >= threshold:
                merges.append({"step": labels[g], "from": i, "into": int(cur[best]),
                               "chain": chain_of[g - 1][i], "cosine": round(float(cos[r, best]),
                                                                              4)})
            else:
                deaths.append({"step": labels[g], "latent": i, "chain": chain_of[g - 1][i]})
    # a chain seen in one group only, between two others, is a flicker (a latent of one SAE
    # that no neighbour has), not a feature born and dead: listed apart
    flicker = {c for c, links in enumerate(chains) if len(links) < MIN_CHAIN and G > MIN_CHAIN}
    flickers = [{"step": labels[chains[c][0][0]], "latent": chains[c][0][1], "chain": c}
                for c in sorted(flicker)]
    births = [b for b in births if b["chain"] not in flicker]
    deaths = [d for d in deaths if d["chain"] not in flicker]
    born = {b["chain"]: b["step"] for b in births}
    died = {d["chain"]: d["step"] for d in deaths}
    rel = np.zeros((len(chains), G))
    for c, links in enumerate(chains):
        for g, j in links:
            rel[c, g] = freqs[g][j]
    rel = rel / np.maximum(rel.max(1, keepdims=True), 1e-30)
    def kind(c: int) -> str:
        if c in flicker:
            return "flicker"
        if c in born:
            return "transient" if c in died else "born"
        if c in died:
            return "died"
        whole = chains[c][0][0] == 0 and chains[c][-1][0] == G - 1
        return "shared" if whole else "split_or_merged"

    kinds = [kind(c) for c in range(len(chains))]
    return {"chains": chains, "births": births, "deaths": deaths, "flickers": flickers,
            "splits": splits,
            "merges": merges, "matched_cosine": matched_cos,
            "birth_step": [born.get(c) for c in range(len(chains))],
            "death_step": [died.get(c) for c in range(len(chains))],
            "kind": kinds, "relative_frequency": np.round(rel, 4).tolist(),
            "births_per_step": {str(s): sum(b["step"] == s for b in births) for s in labels[1:]},
            "deaths_per_step": {str(s): sum(d["step"] == s for d in deaths) for s in labels[1:]},
            "born_late": [b["chain"] for b in births],
            "peak_step": [labels[int(np.argmax(r))] for r in rel]}
