"""``circuit``: activation patching from clean into corrupted runs, per layer and per neuron.

Usage::

    from mechray.analysis.base import Context, get_analysis

    circuit = get_analysis("circuit", {"corruption": "noise", "check_neurons": 16})
    result = circuit.run(Context(store=store, model=model, eval_data=x), "popt")
    result["layer_effect"]    # fraction of the clean output restored by patching the whole layer
    result["ranked"][:3]      # [{"neuron": 5, "effect": 0.97, "attribution": .., "exact": ..}, ...]
    result["attribution_check"]["spearman"]   # attribution vs exact patching on a sample

Clean inputs are ``ctx.eval_data``; corrupted ones are a seeded derangement of them
(``shuffle``), the clean ones plus Gaussian noise scaled by their std (``noise``), or prompt
pairs (``pairs``; ``auto``, the default, uses them when given): ``run_mechint_eval(eval_data=
clean, corrupt_data=corrupted)``, ``eval_data=PromptPairs(clean, corrupted)``, the CLI's
``--corrupt-texts``, HTTP ``eval_inputs.corrupt_texts``, or ``ctx.corrupt_data`` set in Python
(same shape as the clean inputs).  Metrics beyond ``mse``/``kl``/``loss``: ``logit_diff``
(``answer_tokens=[correct, wrong]``) and ``prob`` (``target_token``) at each example's last
real token (left or right padding).  With pairs, ``positions`` holds the effect of patching the
layer at one sequence position at a time (the layer x position grid, row by row over layers).
When attribution ranks the exactly patched neurons unlike exact patching (Spearman below
``agreement`` or a different top neuron), ``warnings`` says so.  Every effect is
normalised: ``1 - metric(patched, clean) / metric(corrupt, clean)`` (1 = fully restored).

Per neuron, ``method='attribution'`` (default) estimates every neuron's effect from one backward
pass (gradient of the metric at the corrupt run x (clean - corrupt) activation, summed over
positions) and patches ``check_neurons`` neurons exactly (half the top by attribution, half drawn
at random) to report how well the estimate ranks them; ``method='exact'`` patches every neuron.

Path patching (``paths=True``): for each other captured layer R that runs after this one, the
effect of this layer on the output mediated only by R: record R in a corrupt run with this layer
patched clean, then run corrupt with only R set to that recording.  It is exact (no linear
approximation) and a layer R that does not depend on this one gets 0.

Heads: on an attention module's ``:heads`` layer (``transformer.h.1.attn:heads``) the units are
heads -- one head's ``d_head`` outputs patched together, attribution summed over them -- and
``ranked`` holds ``{"head": h, ...}`` (``method='exact'`` patches every head, cheap for a few).
``metric='lm_loss'`` scores the corrupted runs on the clean prompts' next tokens.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from mechray.analysis.base import Analysis, Context, Cost, Skip, Workload, register
from mechray.analysis.causal import (
    InterventionParams,
    intervention_bytes,
    prepare,
    ranked,
)
from mechray.analysis.inputs import ModelInputs, as_inputs
from mechray.analysis.intervene import (
    can_stack,
    edit_output,
    eval_inputs,
    eval_mode,
    find_module,
    model_of,
    output_of,
    prefixes,
    record_outputs,
    sweep,
)
from mechray.analysis.render import plot_ranked, top_effects

log = logging.getLogger(__name__)


class CircuitParams(InterventionParams):
    corruption: Literal["auto", "shuffle", "noise", "pairs"] = Field(
        "auto", description="auto: the prompt pairs when eval_data holds them, else shuffle")
    noise_scale: float = Field(1.0, gt=0, le=1000, description="noise std / input std")
    method: Literal["attribution", "exact"] = "attribution"
    check_neurons: int = Field(16, ge=0, le=100_000, description="neurons patched exactly")
    top_k: Optional[int] = Field(100, ge=1, description="ranked entries kept (None: all)")
    paths: bool = Field(True, description="path patching through later captured layers")
    positions: bool = Field(True, description="with prompt pairs: patch the layer one sequence "
                            "position at a time (a layer x position grid over layers)")
    max_positions: int = Field(128, ge=1, le=4096, description="longest sequence patched "
                               "position by position (one forward per position)")
    agreement: float = Field(0.8, ge=-1, le=1, description="warn below this Spearman "
                             "correlation between attribution and exact patching")


@register
class Circuit(Analysis):
    name = "circuit"
    kind = "model"
    Params = CircuitParams
    summary = "activation, attribution and path patching between a clean and a corrupted input"
    columns = (("layer effect", lambda r: r.get("layer_effect")), ("top neurons", top_effects))
    plot_file = "circuit_effects.png"
    plot = staticmethod(plot_ranked)

    @classmethod
    def cost(cls, p: CircuitParams, w: Workload) -> Cost:
        forward = 2.0 * max(w.model_params, 1) * min(p.n_inputs, w.inputs)
        passes = (w.d if p.method == "exact" else p.check_neurons) + 4 + \
            (w.layers if p.paths else 0)
        return Cost(forward * passes, intervention_bytes(p, w))

    def run(self, ctx: Context, layer: str) -> dict[str, Any]:
        p: CircuitParams = self.params
        t0 = time.perf_counter()
        seed = ctx.seed if p.seed is None else p.seed
        clean = eval_inputs(ctx, p.n_inputs)
        corrupt = corrupt_inputs(ctx, clean, p, seed)
        model = model_of(ctx)
        with eval_mode(model):
            prep = prepare(ctx, layer, clean, p, corrupt, grad=True)
            metric, both, d = prep.metric, prep.batches, prep.width
            with prep.swapped():
                xs, xr = both[: len(both) // 2], both[len(both) // 2:]
                acts_c, refs = _record(model, layer, xs)
                acts_r, outs_r = _record(model, layer, xr)
                masks = [x.mask for x in xs]     # real positions of the clean inputs are compared
                ids = [x.targets for x in xs]    # lm_loss: the clean tokens are predicted
                metric.reference(refs, masks, ids)
                xr = [_with_mask(r, m, i) for r, m, i in zip(xr, masks, ids)]
                count = sum(metric.count(r, m, i) for r, m, i in zip(refs, masks, ids))
                mean_r = float(sum(metric.sums(o[None], r, m, i)[0]
                                   for o, r, m, i in zip(outs_r, refs, masks, ids)) / count)
                m_r = float(metric.finish(torch.tensor(mean_r)))
                if metric.negligible(m_r, refs):
                    raise Skip(f"corruption={p.corruption!r} does not change the {p.metric} metric "
                               f"beyond rounding ({m_r:.3g}), so there is nothing to restore; use "
                               f"another corruption or metric, or give ctx.corrupt_data")
                batches = list(zip(xr, refs))
                patch = lambda b, call, positions: _call(acts_c[b], call, layer)  # noqa: E731
                skip = prefixes(model, layer, batches) if p.reuse_prefix else None
                layer_m = float(sweep(model, layer, batches, patch, metric, None, skip=skip)[0])
                label = f"circuit {layer}" if ctx.progress else None
                attr = _attribution(model, layer, batches, acts_c, acts_r, metric, mean_r, count, d)
                unit, units = prep.unit, d // prep.unit      # heads: d_head features each
                attr_effect = -attr.reshape(units, unit).sum(1) / m_r   # a head: its block's sum
                stack = prep.plan.neuron_batch if can_stack(model, layer, xr[0]) else 1
                sample = _sample(attr_effect, units,
                                 p.check_neurons if p.method == "attribution" else units, seed)
                exact = torch.full((units,), float("nan"))
                if len(sample):
                    exact[sample] = 1 - sweep(model, layer, batches, patch, metric, sample, stack,
                                              label, skip=skip, unit=unit) / m_r
                paths = _paths(ctx, model, layer, batches, acts_c, metric, m_r) if p.paths else {}
                grid = _positions(model, layer, batches, acts_c, metric, m_r, clean) \
                    if p.positions and corrupt is clean.corrupt and \
                    max(r.shape[1] if r.dim() >= 3 else 0 for r in refs) <= p.max_positions \
                    else None
        effect = exact if p.method == "exact" else attr_effect
        key = "head" if unit > 1 else "neuron"
        entries = ranked(torch.arange(units), effect, key, attribution=attr_effect)
        for e in entries:
            if not torch.isnan(exact[e[key]]):
                e["exact"] = float(exact[e[key]])
        check = _check(attr_effect[sample], exact[sample], sample)
        warnings = _disagreement(check, p.agreement, p.method)
        log.info("mechray: circuit %s: layer effect %.3f, %.2fs", layer, 1 - layer_m / m_r,
                 time.perf_counter() - t0)
        return {
            "layer_effect": 1 - layer_m / m_r, "ranked": entries[: p.top_k],
            "method": f"activation patching + {p.method}", "metric": p.metric,
            "corruption": "pairs" if corrupt is clean.corrupt else
            ("shuffle" if p.corruption == "auto" else p.corruption),
            "corrupt_metric": m_r, "patched_metric": layer_m,
            "attribution_check": check, "warnings": warnings, "positions": grid,
            "paths": paths, "n_neurons": d, "n_inputs": len(clean),
            **({"n_heads": units, "d_head": unit} if unit > 1 else {}),
            "masked": clean.mask is not None,
            "unembedding": "read out lazily" if prep.readout is not None else None,
            "memory": prep.plan.describe(),
            "seconds": round(time.perf_counter() - t0, 3),
        }


def corrupt_inputs(ctx: Context, clean: ModelInputs, p: CircuitParams, seed: int
                   ) -> ModelInputs:
    """The corrupted counterpart of every clean input."""
    gen = torch.Generator().manual_seed(seed)
    if p.corruption in ("auto", "pairs") and clean.corrupt is not None:
        return clean.corrupt
    if p.corruption == "pairs":
        given = getattr(ctx, "corrupt_data", None)
        if given is None:
            raise Skip("corruption='pairs' needs prompt pairs: run_mechint_eval(eval_data=clean, "
                       "corrupt_data=corrupted), eval_data=PromptPairs(clean, corrupted), the "
                       "CLI's --corrupt-texts, the request's eval_inputs.corrupt_texts, or "
                       "ctx.corrupt_data set in Python")
        given = as_inputs(given, len(clean))
        if given.shapes != clean.shapes:
            raise ValueError(f"ctx.corrupt_data has shapes {given.shapes} but the clean "
                             f"inputs have {clean.shapes}; give one corrupted input per clean")
        return given
    if p.corruption in ("shuffle", "auto"):
        if len(clean) < 2:
            raise Skip("corruption='shuffle' needs at least 2 eval inputs; use 'noise'")
        perm = torch.randperm(len(clean), generator=gen)
        source = torch.empty_like(perm)
        source[perm] = perm.roll(-1)          # a derangement: no input is paired with itself
        return clean.select(source)
    x = clean.tensor
    if x is None or not x.is_floating_point():
        raise ValueError(f"corruption='noise' needs one float input tensor, eval_data is "
                         f"{x.dtype if x is not None else 'keyword inputs ' + str(clean.shapes)}; "
                         f"use corruption='shuffle' or 'pairs'")
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
    return ModelInputs(x + p.noise_scale * x.float().std().to(x.dtype) * noise)


def _with_mask(x: ModelInputs, mask, ids=None) -> ModelInputs:
    """``x`` run as is, but edited and compared at the clean batch's real positions (and, for
    ``lm_loss``, scored on the clean batch's tokens ``ids``)."""
    return ModelInputs(x.tensor, x.kwargs, x.mask_key, positions=mask, ids=ids)


def _record(model, layer: str, xs: list[ModelInputs]):
    """Per batch: the layer's outputs (one per call) and the model's output."""
    acts, outs = [], []
    with torch.no_grad():
        for x in xs:
            with record_outputs(model, layer) as got:
                outs.append(output_of(x(model)).float())
            acts.append(got)
    return acts, outs


def _call(acts: list[torch.Tensor], call: int, layer: str) -> torch.Tensor:
    if call >= len(acts):
        raise ValueError(f"layer {layer!r} ran {call + 1} times in a patched run but {len(acts)} "
                         f"times in the clean run; patching needs the same control flow")
    return acts[call].reshape(-1, acts[call].shape[-1])


def _attribution(model, layer, batches, acts_c, acts_r, metric, mean_r, count, d) -> torch.Tensor:
    """Sum over positions of d metric / d activation (at the corrupt run) x (clean - corrupt)."""
    total = torch.zeros(d)
    scale = metric.finish_grad(mean_r) / count
    for b, (x, ref) in enumerate(batches):
        leaves: list[torch.Tensor] = []

        def leaf(t: torch.Tensor, call: int) -> torch.Tensor:
            leaves.append(t.detach().clone().requires_grad_(True))
            return leaves[-1]

        with torch.enable_grad(), edit_output(model, layer, leaf):
            y = output_of(x(model))
            m = metric.sums(y[None], ref.to(y.device), x.mask, x.targets)[0] * scale
            grads = torch.autograd.grad(m, leaves, allow_unused=True)
        for call, (g, a_r) in enumerate(zip(grads, acts_r[b])):
            if g is not None:
                diff = _call(acts_c[b], call, layer) - a_r.reshape(-1, d)
                total += (g.reshape(-1, d).float() * diff.float()).sum(0).cpu()
    return total


def _sample(attr_effect: torch.Tensor, d: int, n: int, seed: int) -> torch.Tensor:
    """Neurons to patch exactly: all when n >= d, else the top n/2 by |attribution| plus random."""
    if n >= d:
        return torch.arange(d)
    top = torch.topk(attr_effect.abs(), (n + 1) // 2).indices
    rest = torch.ones(d, dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().flatten()
    pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))]
    return torch.sort(torch.cat([top, pick[: n - len(top)]])).values


def _check(attr: torch.Tensor, exact: torch.Tensor, sample: torch.Tensor) -> dict[str, Any]:
    """How well attribution patching ranks the neurons that were patched exactly."""
    if len(sample) == 0:
        return {"n": 0, "neurons": [], "spearman": None, "top1_agree": None, "max_abs_error": None}
    return {"n": len(sample), "neurons": sample.tolist(), "spearman": spearman(attr, exact),
            "top1_agree": bool(int(torch.argmax(attr)) == int(torch.argmax(exact))),
            "max_abs_error": float((attr - exact).abs().max())}


def _disagreement(check: dict[str, Any], floor: float, method: str) -> list[str]:
    """Warnings when attribution ranks the exactly patched neurons unlike exact patching."""
    if method != "attribution" or check["n"] < 3:
        return []
    rho, top1 = check["spearman"], check["top1_agree"]
    if (rho is not None and rho >= floor) and top1:
        return []
    return [f"attribution patching disagrees with exact patching on the {check['n']} neurons "
            f"checked (Spearman {rho if rho is None else round(rho, 3)}, top-1 "
            f"{'agrees' if top1 else 'differs'}, max |error| {check['max_abs_error']:.3g}); the "
            f"ranking follows attribution: use method='exact' (or read each entry's 'exact')"]


def _positions(model, layer: str, batches, acts_c, metric, m_r: float,
               clean: ModelInputs) -> Optional[list[dict[str, Any]]]:
    """Per sequence position: the fraction restored by patching the layer's clean output at that
    position only (padded positions of the inputs; ``token_id`` of the first clean example)."""
    if any(a.dim() < 3 for acts in acts_c for a in acts):
        return None
    width = max(ref.shape[1] for _, ref in batches)
    ids = clean.kwargs.get("input_ids") if clean.tensor is None else None
    mask = clean.mask
    out = []
    with torch.no_grad():
        for pos in range(width):
            total, count = 0.0, 0
            for b, (x, ref) in enumerate(batches):
                if pos >= ref.shape[1]:
                    continue

                def patch(t: torch.Tensor, call: int, b=b, pos=pos) -> torch.Tensor:
                    new = t.clone()
                    new[:, pos] = _call(acts_c[b], call, layer).reshape(t.shape)[:, pos]
                    return new
                with edit_output(model, layer, patch):
                    y = output_of(x(model))
                total += float(metric.sums(y[None], ref.to(y.device), x.mask, x.targets)[0])
                count += metric.count(ref, x.mask, x.targets)
            value = float(metric.finish(torch.tensor(total / max(count, 1))))
            real = mask is None or (pos < mask.shape[1] and bool(mask[0, pos]))
            out.append({"position": pos, "effect": 1 - value / m_r,
                        "token_id": int(ids[0, pos]) if ids is not None and real and
                        pos < ids.shape[1] else None})
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Spearman rank correlation (ties share their mean rank); ``None`` when a side is constant."""
    ra, rb = _ranks(a.double().numpy()), _ranks(b.double().numpy())
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _paths(ctx, model, sender, batches, acts_c, metric, m_r) -> dict[str, dict[str, float]]:
    """Effect of ``sender`` mediated only by each later captured layer (exact path patching)."""
    receivers = _later_layers(ctx, model, sender, batches[0][0])
    out: dict[str, dict[str, float]] = {}
    for r in receivers:
        through: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for b, (x, _) in enumerate(batches):
                def patch(t, call, b=b):
                    return _call(acts_c[b], call, sender).reshape(t.shape)

                with edit_output(model, sender, patch), record_outputs(model, r) as got:
                    x(model)
                through.append(got)
        fill = lambda b, call, positions: _call(through[b], call, r)  # noqa: E731
        out[r] = {"effect": 1 - float(sweep(model, r, batches, fill, metric, None,
                                            reuse=False)[0]) / m_r}
    return out


def _later_layers(ctx, model, sender: str, x: ModelInputs) -> list[str]:
    """Captured layers (other than ``sender``) whose first call comes after ``sender``'s."""
    if ctx.store is None:
        return []
    names = [n for n in ctx.store.layers() if n != sender]
    order: list[str] = []
    handles = []
    try:
        for n in [sender] + names:
            try:
                module = find_module(model, n)
            except KeyError:
                continue
            handles.append(module.register_forward_hook(
                lambda m, i, o, n=n: order.append(n) if n not in order else None))
        with torch.no_grad():
            x(model)
    finally:
        for h in handles:
            h.remove()
    if sender not in order:
        return []
    return order[order.index(sender) + 1:]
