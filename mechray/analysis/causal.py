"""``causal``: how much the model's output changes when each neuron of a layer is ablated.

Usage::

    from mechray.analysis.base import Context, get_analysis

    causal = get_analysis("causal", {"method": "mean", "metric": "mse", "top_n": 64})
    result = causal.run(Context(store=store, model=model, eval_data=x), "popt")
    result["ranked"][:3]     # [{"neuron": 7, "effect": 0.41}, ...]  largest first
    result["layer_effect"]   # the whole layer ablated at once

Methods: ``zero`` sets the neuron to 0; ``mean`` to its mean (from the ``neuron`` results when
present, else from stored rows); ``resample`` to its value in a stored row drawn at random per
position (seeded; the whole-layer ablation takes whole stored rows, so correlations stay).
Metrics: ``mse`` between ablated and clean outputs, ``kl`` (clean || ablated) for logits, or
``loss`` with ``loss_fn="package.module:function"`` (or ``ctx.loss_fn``): ``|loss change|``.
Layers wider than ``top_n`` ablate only their ``top_n`` highest-variance neurons.  Neurons share
forward passes ``neuron_batch`` at a time by stacking copies of the eval batch when that is
exact for the model (checked on the first batch), else one per pass; the layer and the modules
that finish before it are run once per batch and replayed, so each pass computes only what comes
after the layer (``reuse_prefix``, checked too).
Inputs with an ``attention_mask`` are batched by length with padding trimmed, and padded
positions are neither ablated nor counted in the metric (left or right padding).

Decoder-only LMs: ``logit_diff`` (``answer_tokens=[correct, wrong]``) and ``prob``
(``target_token``) read each example's last real token; when the model's output is its
unembedding of a hidden state, logits are never materialised for the sweep
(:mod:`mechray.analysis.readout`); a probe forward estimates the peak memory first and
``batch_size``/``neuron_batch`` shrink to ``memory_budget_gb`` (:mod:`mechray.analysis.footprint`,
``result["memory"]``).  ``method='corrupt'`` sets each neuron to its value in the paired
corrupted prompt (prompt pairs, see :class:`mechray.analysis.inputs.PromptPairs`).
``metric='lm_loss'``: ``|change|`` of the LM's next-token cross-entropy on the inputs' tokens.
Attention heads: on a ``transformer.h.1.attn:heads`` layer (:mod:`mechray.capture.heads`) each
unit is a head (its ``d_head`` features ablated together) and ``ranked`` holds
``{"head": h, "effect": x}``; :func:`mechray.analysis.heads.head_table` merges layers.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator

from mechray.analysis.base import Analysis, Context, Cost, Params, Skip, Workload, register
from mechray.analysis.footprint import GB, Footprint, Plan, available_bytes
from mechray.analysis.inputs import ModelInputs
from mechray.analysis.intervene import (
    LOSS_FN_PATTERN,
    READ_OUT,
    Metric,
    can_stack,
    clean_runs,
    eval_inputs,
    eval_mode,
    find_module,
    model_of,
    record_outputs,
    resolve_loss_fn,
    sweep,
)
from mechray.analysis.readout import Readout
from mechray.analysis.render import plot_ranked, top_effects
from mechray.capture.heads import HEADS, head_point

log = logging.getLogger(__name__)


class InterventionParams(Params):
    """Parameters shared by ``causal`` and ``circuit``."""

    metric: Literal["mse", "kl", "loss", "lm_loss", "logit_diff", "prob"] = Field(
        "mse", description="mse/kl of the outputs; loss: |change| of loss_fn; lm_loss: |change| "
        "of the LM's next-token cross-entropy on the inputs' real tokens; logit_diff: "
        "logit of answer_tokens[0] minus answer_tokens[1] at each example's last real token; "
        "prob: probability of target_token there")
    answer_tokens: Optional[list[int]] = Field(None, min_length=2, max_length=2,
                                               description="[correct, wrong] token ids")
    target_token: Optional[int] = Field(None, ge=0, description="token id for metric='prob'")
    loss_fn: Optional[str] = Field(None, pattern=LOSS_FN_PATTERN,
                                   description="'package.module:function' for metric='loss'")
    n_inputs: int = Field(256, ge=1, le=1_000_000, description="eval inputs used")
    batch_size: int = Field(64, ge=1, le=65_536, description="eval inputs per forward pass")
    neuron_batch: int = Field(16, ge=1, le=4096, description="neurons per forward pass")
    reuse_prefix: bool = Field(True, description="skip re-running the modules that finish "
                               "before the layer (checked to leave the output unchanged)")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 32 - 1,
                                description="default: the context's seed")
    memory_budget_gb: Optional[float] = Field(
        None, gt=0, le=1_000_000, description="peak memory allowed; batch_size and neuron_batch "
        "shrink to fit (default: half the free memory of the model's device)")

    @model_validator(mode="after")
    def _loss(self):
        if self.loss_fn is not None and self.metric != "loss":
            raise ValueError(f"loss_fn={self.loss_fn!r} is only used with metric='loss' "
                             f"(metric is {self.metric!r}); set metric='loss' or drop loss_fn")
        if (self.metric == "logit_diff") != (self.answer_tokens is not None):
            raise ValueError("metric='logit_diff' goes with answer_tokens=[correct, wrong] "
                             f"(token ids); got metric={self.metric!r}, "
                             f"answer_tokens={self.answer_tokens}")
        if (self.metric == "prob") != (self.target_token is not None):
            raise ValueError("metric='prob' goes with target_token=<token id>; got "
                             f"metric={self.metric!r}, target_token={self.target_token}")
        return self

    def tokens(self) -> Optional[list[int]]:
        """The token ids the metric reads."""
        if self.metric == "logit_diff":
            return self.answer_tokens
        return [self.target_token] if self.target_token is not None else None


class CausalParams(InterventionParams):
    method: Literal["zero", "mean", "resample", "corrupt"] = Field(
        "zero", description="corrupt: each neuron set to its value in the paired corrupted "
        "prompt (needs prompt pairs; neurons ranked by how much the pairs differ there)")
    top_n: int = Field(64, ge=1, le=1_000_000, description="ablate the top-N neurons by variance")
    max_rows: int = Field(4096, ge=1, le=10_000_000,
                          description="stored rows read for means, variances and resampling")


def intervention_bytes(p: InterventionParams, w: Workload) -> float:
    """Peak bytes of an intervention analysis: the model (with gradients) plus batched edits."""
    acts = p.batch_size * p.neuron_batch * w.d * 4 * 8
    return float(w.model_params) * 4 * 4 + acts + float(w.shard_rows) * w.d * 8 * 3


@dataclass
class Prepared:
    """What a sweep needs, fixed before it starts."""

    metric: Metric
    batches: list[ModelInputs]      # eval batches (``pair``'s follow when given)
    width: int                      # the layer's feature count
    unit: int                       # features per ranked unit: 1, or d_head on a :heads layer
    readout: Optional[Readout]      # the model's unembedding, read out lazily (or None)
    plan: Plan                      # batch sizes within the memory budget

    def swapped(self) -> Any:
        """Run the model with the unembedding read out lazily (no-op without one)."""
        return self.readout.swapped() if self.readout is not None else nullcontext()


def prepare(ctx: Context, layer: str, x: ModelInputs, params: InterventionParams,
            pair: Optional[ModelInputs] = None, grad: bool = False) -> Prepared:
    """The metric, the readout, batch sizes that fit the memory budget, and the eval inputs
    split into batches of that size (similar lengths together; ``pair``'s batches follow,
    aligned).  Checks the layer; raises ``AnalysisParamsError`` when nothing fits."""
    metric = Metric(params.metric, resolve_loss_fn(params.loss_fn, ctx)
                    if params.metric == "loss" else None, params.tokens())
    model = model_of(ctx)
    probe = x.select(slice(0, min(len(x), 2)))
    with torch.no_grad(), record_outputs(model, layer) as acts:
        probe(model)
    if not acts:
        raise ValueError(f"layer {layer!r} did not run in the model's forward pass on eval_data; "
                         f"check that eval_data are inputs of this model")
    d = acts[0].shape[-1]
    readout = Readout.find(model, layer, probe) if metric.name in READ_OUT else None
    metric.read_out(readout)
    with readout.swapped() if readout is not None else nullcontext():
        foot = Footprint.measure(model, probe, sum(a.numel() * 4 for a in acts))
    budget = int(params.memory_budget_gb * GB) if params.memory_budget_gb is not None else \
        available_bytes(model) // 2
    n = len(x) * (2 if pair is not None else 1)
    plan = foot.fit(n, params.batch_size, params.neuron_batch, budget,
                    f"{type(params).__name__.removesuffix('Params').lower()} {layer!r}",
                    grad=grad)
    unit = head_point(find_module(model, layer), layer).d_head if layer.endswith(HEADS) else 1
    return Prepared(metric, x.batches(plan.batch_size, pair), d, unit, readout, plan)


def ranked(neurons: torch.Tensor, effects: torch.Tensor, key: str = "neuron",
           **extra: torch.Tensor) -> list[dict[str, Any]]:
    """``[{"neuron": i, "effect": x, ...}]`` largest effect first (ties by index); ``key``
    names the unit (``"head"`` on a ``:heads`` layer)."""
    order = sorted(range(len(neurons)), key=lambda j: (-float(effects[j]), int(neurons[j])))
    return [{key: int(neurons[j]), "effect": float(effects[j]) + 0.0,       # no -0.0
             **{k: float(v[j]) + 0.0 for k, v in extra.items()}} for j in order]


@register
class Causal(Analysis):
    name = "causal"
    kind = "model"
    Params = CausalParams
    summary = "ablate neurons (zero, mean, resample) and rank them by their effect on the output"
    columns = (("method", lambda r: r.get("method")), ("metric", lambda r: r.get("metric")),
               ("layer effect", lambda r: r.get("layer_effect")), ("top neurons", top_effects))
    plot_file = "causal_effects.png"
    plot = staticmethod(plot_ranked)

    @classmethod
    def cost(cls, p: CausalParams, w: Workload) -> Cost:
        forward = 2.0 * max(w.model_params, 1) * min(p.n_inputs, w.inputs)
        passes = min(p.top_n, w.d) + 2
        return Cost(forward * passes, intervention_bytes(p, w))

    def run(self, ctx: Context, layer: str) -> dict[str, Any]:
        p: CausalParams = self.params
        t0 = time.perf_counter()
        seed = ctx.seed if p.seed is None else p.seed
        x = eval_inputs(ctx, p.n_inputs)                     # Skip without model or inputs
        model = model_of(ctx)
        if p.method == "corrupt" and x.corrupt is None:
            raise Skip("method='corrupt' needs prompt pairs: run_mechint_eval(eval_data=clean, "
                       "corrupt_data=corrupted), --corrupt-texts, or eval_inputs.corrupt_texts")
        with eval_mode(model):
            prep = prepare(ctx, layer, x, p, x.corrupt if p.method == "corrupt" else None)
            metric, xs, d = prep.metric, prep.batches, prep.width
            unit, units = prep.unit, d // prep.unit      # heads: d_head features each
            if p.method == "corrupt":
                xs, fill, var, mean = self._corrupt(model, layer, prep, d)
                source = "prompt pairs"
            else:
                mean, var, source = self._neuron_stats(ctx, layer, d)
                rows = None                 # stored rows: read only for what the results lack
                if p.method == "resample" or (source == "none" and
                                              (p.method == "mean" or units > p.top_n)):
                    rows = self._rows(ctx, layer, p, d)
                if source == "none" and rows is not None:
                    mean, var, source = rows.mean(0), rows.var(0, unbiased=False), "stored rows"
                fill = self._fill(p.method, mean, rows, d, seed)
            with prep.swapped():
                stack = prep.plan.neuron_batch if can_stack(model, layer, xs[0]) else 1
                batches, skip = clean_runs(model, layer, xs, min(stack, 2), p.reuse_prefix)
                metric.reference([ref for _, ref in batches], [x.mask for x, _ in batches],
                                 [x.targets for x, _ in batches])
                neurons = torch.arange(units) if units <= p.top_n else torch.sort(torch.topk(
                    var.reshape(units, unit).sum(1), p.top_n).indices).values
                label = f"causal {layer}" if ctx.progress else None
                effects = sweep(model, layer, batches, fill, metric, neurons, stack, label,
                                skip=skip, unit=unit)
                layer_effect = float(sweep(model, layer, batches, fill, metric, None,
                                           skip=skip)[0])
        log.info("mechray: causal %s: %d neurons, %s/%s, %.2fs", layer, len(neurons), p.method,
                 p.metric, time.perf_counter() - t0)
        return {
            "ranked": ranked(neurons, effects, "head" if unit > 1 else "neuron"),
            "method": p.method, "metric": p.metric, "layer_effect": layer_effect,
            "n_evaluated": len(neurons), "n_neurons": d, "n_inputs": len(x),
            **({"n_heads": units, "d_head": unit} if unit > 1 else {}),
            "masked": x.mask is not None, "neurons_per_pass": stack,
            "prefix_reused": skip[0] is not None if skip else False,
            "selection": "all" if units <= p.top_n else f"top {p.top_n} by variance",
            "stats_source": source, "seconds": round(time.perf_counter() - t0, 3),
            "unembedding": "read out lazily" if prep.readout is not None else None,
            "memory": prep.plan.describe(),
        }

    @staticmethod
    def _corrupt(model: Any, layer: str, prep: Prepared, d: int) -> tuple:
        """``(clean batches, fill, variance, mean)`` for ``method='corrupt'``: the corrupted
        run's layer outputs fill each edited neuron; neurons are ranked by the mean squared
        clean - corrupted difference at real positions."""
        half = len(prep.batches) // 2
        xs, xr = prep.batches[:half], prep.batches[half:]
        acts: list[list[torch.Tensor]] = []
        diff, count = torch.zeros(d), 0
        with torch.no_grad(), prep.swapped():
            for x, r in zip(xs, xr):
                with record_outputs(model, layer) as got_r:
                    r(model)
                with record_outputs(model, layer) as got_c:
                    x(model)
                acts.append([a.reshape(-1, d) for a in got_r])
                for a, c in zip(got_r, got_c):
                    sq = (a.float() - c.float()).pow(2).reshape(-1, d)
                    m = x.mask
                    keep = m.reshape(-1).to(sq.device) if m is not None and \
                        m.numel() == len(sq) else torch.ones(len(sq), dtype=torch.bool)
                    diff += sq[keep].sum(0).cpu()
                    count += int(keep.sum())

        def fill(b: int, call: int, positions: int) -> torch.Tensor:
            if call >= len(acts[b]):
                raise ValueError(f"layer {layer!r} ran {call + 1} times in an edited run but "
                                 f"{len(acts[b])} times in the corrupted run")
            return acts[b][call]
        return xs, fill, diff / max(count, 1), None

    @staticmethod
    def _rows(ctx: Context, layer: str, p: CausalParams, d: int) -> torch.Tensor:
        if ctx.store is None:
            raise ValueError(f"method={p.method!r} with top_n={p.top_n} on {d} neurons needs "
                             f"stored rows of {layer!r} (or 'neuron' results); give a store")
        rows = ctx.store.read_layer(layer, p.max_rows).float()
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.shape[-1] != d:
            raise ValueError(f"layer {layer!r}: stored rows have {rows.shape[-1]} features but the "
                             f"model's layer outputs {d}; analyse the model the shards came from")
        return rows

    @staticmethod
    def _neuron_stats(ctx: Context, layer: str, d: int) -> tuple:
        """``(mean, variance, source)`` from the ``neuron`` results when they cover the layer."""
        stats = ctx.results.get("neuron", {}).get(layer) or {}
        if isinstance(stats.get("mean"), list) and len(stats["mean"]) == d and \
                isinstance(stats.get("std"), list) and len(stats["std"]) == d:
            return (torch.tensor(stats["mean"], dtype=torch.float32),
                    torch.tensor(stats["std"], dtype=torch.float32) ** 2, "neuron results")
        return None, None, "none"

    @staticmethod
    def _fill(method: str, mean: Optional[torch.Tensor], rows: Optional[torch.Tensor], d: int,
              seed: int):
        if method == "zero":
            zeros = torch.zeros(1, d)
            return lambda b, call, positions: zeros
        if method == "mean":
            if mean is None:
                raise ValueError("method='mean' needs neuron means: run the 'neuron' analysis "
                                 "first or give a store with rows of this layer")
            return lambda b, call, positions: mean[None]
        if rows is None or len(rows) == 0:
            raise ValueError("method='resample' needs stored rows of this layer; give a store")
        drawn: dict[tuple[int, int, int], torch.Tensor] = {}

        def resample(b: int, call: int, positions: int) -> torch.Tensor:
            key = (b, call, positions)
            if key not in drawn:  # the same draw for every neuron and pass of this batch
                gen = torch.Generator().manual_seed(seed * 1_000_003 + b * 1009 + call)
                drawn[key] = rows[torch.randint(len(rows), (positions,), generator=gen)]
            return drawn[key]
        return resample

