"""``crosscoder``: one sparse dictionary for every saved training step, and when each feature is born.

Usage::

    from mechray.analysis import get_analysis, Context

    cc = get_analysis("crosscoder", {"k": 8, "expansion_factor": 4})    # every saved step
    result = cc.fit(Context(store=ShardStore("./mechint_cache"), out_dir=Path("results")), "popt")
    result["steps"]                 # [0, 100, 200, ...]: first saved step of each step group
    result["birth_step"][i], result["peak_step"][i], result["death_step"][i], result["kind"][i]
    result["born_late"]             # latents born after the first group, strongest first
    result["decoder_norm"][i][g]    # ||W_dec^g_i|| per latent and group
    result["pairing"]               # "same_inputs" / "positions" (paired) or "unpaired"
    result["weights_path"]          # "crosscoder/popt.safetensors" (load_crosscoder)

The rows of the layer are grouped by saved step (``training_steps`` picks steps, ``step_groups``
joins consecutive ones); the crosscoder is *paired* when the same inputs were captured at every
group (a probe batch: ``MechIntCallback(config, probe_inputs=x)``), *unpaired* otherwise
(formulas: :mod:`mechray.analysis.crosscoder_model`; grouping and pairing:
:mod:`mechray.analysis.step_rows`).  Each group's rows are scaled to mean norm ``sqrt(d)``
(``normalize_input``) so a step whose activations grew does not dominate.

Per latent ``i`` and group ``g``: ``decoder_norm`` ``||W_dec^g_i||``, ``frequency`` (fraction
of the group's rows where it fires), ``mean_activation`` and ``strength = mean_activation *
decoder_norm`` (the mean norm it adds to a row of that group; paired: one code per input, so
strength is proportional to the decoder norm, Lindsey et al.'s quantity), times the slice's
alignment with the latent's peak direction (:func:`aligned`, ``same_direction``).  Birth, peak
and death come from ``strength`` (:mod:`mechray.analysis.lifetimes`): alive where it is at least
``alive_fraction`` of the latent's own peak; latents firing on fewer than ``min_frequency`` of
the rows (or ``min_rows`` rows) of every group are ``rare`` and not dated; ``dead_fraction``
counts latents that never fire.

Budget (``steps``, ``epochs``, ``min_steps``), lr, schedule, ``converged`` and ``warnings`` are
the ``sae`` ones (:mod:`mechray.analysis.sae.budget`), counted in rows of the training set
(paired: one row per input, all groups concatenated).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from types import SimpleNamespace
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from mechray._util import json_safe as _json_safe
from mechray._util import safe_name
from mechray.analysis.base import (
    JSON_NUMBER,
    Analysis,
    AnalysisParamsError,
    Context,
    Cost,
    Params,
    Skip,
    Workload,
    register,
)
from mechray.analysis.crosscoder_model import StepCrosscoder, StepTrainer, save_crosscoder
from mechray.analysis.lifetimes import lifetimes
from mechray.analysis.sae.analysis import _device
from mechray.analysis.sae.budget import auto_lr, budget_rule, budget_steps, loss_flat, sae_warnings
from mechray.analysis.sae.model import SparseAutoencoder, save_saelens
from mechray.analysis.sae.params import MAX_LATENTS, MAX_PARAMETERS
from mechray.analysis.sae.train import SAETrainer
from mechray.analysis.step_rows import StepRows
from mechray.analysis.timeline import birth_lines, timeline

log = logging.getLogger(__name__)


class StepDictParams(Params):
    """What ``crosscoder`` and ``sae_tracking`` share: the steps, the dictionary, the budget."""

    training_steps: Optional[list[int]] = Field(None, max_length=4096,
                                                description="saved steps to use (None: all)")
    step_groups: Optional[int] = Field(None, ge=2, le=4096,
                                       description="join consecutive saved steps into this many "
                                                   "groups (None: one per saved step)")
    expansion_factor: int = Field(8, ge=1, le=256, description="n_latents = expansion_factor * d")
    n_latents: Optional[int] = Field(None, ge=1, le=MAX_LATENTS, description="overrides expansion")
    k: int = Field(32, ge=1, le=4096, description="active latents per row (TopK)")
    lr: Optional[float] = Field(None, gt=0.0, le=1.0, description="None: auto_lr as sae")
    min_steps: Optional[int] = Field(None, ge=1, le=10_000_000, description="as sae")
    max_epochs: Optional[int] = Field(None, ge=1, le=100_000,
                                      description="the budget's cap in epochs (None: none; "
                                                  "no early stop here, so uncapped by default)")
    epochs: Optional[int] = Field(None, ge=1, le=10_000, description="as sae")
    steps: Optional[int] = Field(None, ge=1, le=10_000_000, description="optimizer steps")
    warmup_steps: Optional[int] = Field(None, ge=0, le=1_000_000)
    batch_size: int = Field(1024, ge=1, le=65536)
    seed: int = Field(0, ge=0, le=2 ** 31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    aux_coefficient: float = Field(1 / 32, ge=0.0, le=100.0)
    dead_steps_threshold: int = Field(256, ge=1, le=10_000_000)
    holdout_fraction: float = Field(0.05, gt=0.0, le=0.5)
    max_rows: Optional[int] = Field(None, ge=1, le=10 ** 10, description="rows per step group")
    normalize_input: bool = True
    min_frequency: float = Field(1e-3, ge=0.0, le=1.0,
                                 description="latents firing less often in every group: rare")
    min_rows: int = Field(20, ge=1, le=10 ** 9,
                          description="latents firing on fewer rows of every group: rare")
    save_weights: bool = True

    @model_validator(mode="after")
    def _k_fits(self) -> "StepDictParams":
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be <= n_latents={self.n_latents}; lower k or "
                             f"raise n_latents")
        return self


class CrosscoderParams(StepDictParams):
    """``crosscoder``'s parameters: :class:`StepDictParams` and how latents are dated."""

    pairing: Literal["auto", "positions", "none"] = "auto"
    aux_k: Optional[int] = Field(None, ge=0, le=MAX_LATENTS,
                                 description="AuxK latents (paired only); None: d // 2")
    alive_fraction: float = Field(0.3, gt=0.0, lt=1.0,
                                  description="alive in a group: strength >= this x its peak")
    absent_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                   description="absent in a group: strength < this x its peak; "
                                               "a birth needs every earlier group absent")
    same_direction: float = Field(0.5, ge=0.0, lt=1.0,
                                  description="a group's slice counts toward the latent's "
                                              "strength only when its cosine with the slice "
                                              "at the latent's peak is at least this")
    top_latents: int = Field(8, ge=0, le=1024,
                             description="latents born late whose top rows are listed")
    k_examples: int = Field(5, ge=1, le=1000)


@register
class Crosscoder(Analysis):
    """A crosscoder over saved training steps per layer (kind ``fit``): births, peaks, deaths."""

    name = "crosscoder"
    kind = "fit"
    Params = CrosscoderParams
    summary = "one sparse dictionary over saved training steps: when each feature is born"
    columns = (("steps", lambda r: f"{r['steps'][0]}–{r['steps'][-1]} ({len(r['steps'])})"),
               ("pairing", lambda r: r["pairing"]),
               ("explained variance", lambda r: r["explained_variance"]),
               ("shared", lambda r: r["counts"]["shared"]),
               ("born", lambda r: r["counts"]["born"] + r["counts"]["transient"]),
               ("died", lambda r: r["counts"]["died"] + r["counts"]["transient"]),
               ("rare", lambda r: r["counts"]["rare"]),
               ("converged", lambda r: r["converged"]),
               ("weights", lambda r: r.get("weights_path")))
    plot_file = "crosscoder_timeline.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        return timeline(per, plt, "relative_strength", "crosscoder: strength / its peak")

    @staticmethod
    def report_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return birth_lines(rows)

    @classmethod
    def answer_bytes(cls, p: CrosscoderParams, w: Workload) -> float:
        latents = float(p.n_latents or p.expansion_factor * w.d)
        groups = float(min(w.steps, p.step_groups or w.steps))
        return JSON_NUMBER * latents * (5 * groups + 6) + 65536

    @classmethod
    def cost(cls, p: CrosscoderParams, w: Workload) -> Cost:
        n, d, latents, groups, size, steps = budget_of(p, w)
        # paired (the dearer form): every row is G groups wide; rows all held in memory
        return Cost(6 * steps * size * latents * d * groups + 2 * n * latents * d,
                    n * d * 4 * 2 + latents * d * groups * 4 * 5 + size * latents * 4 * 4)

    def fit(self, ctx: Context, layer: str) -> dict[str, Any]:
        p: CrosscoderParams = self.params
        if ctx.store is None:
            raise Skip("crosscoder needs stored shards of the layer at several saved steps")
        device = _device(p.device)
        data = StepRows.read(ctx.store, layer, p.training_steps, p.step_groups, p.pairing,
                             p.max_rows)
        groups, d = len(data.groups), data.d
        n_latents = p.n_latents or p.expansion_factor * d
        _check_sizes(p, d, groups, n_latents)
        scales = [math.sqrt(d) / max(float(x.norm(dim=1).mean()), 1e-12)
                  if p.normalize_input and len(x) else 1.0 for x in data.x]
        xs = [(x * s).to(device) for x, s in zip(data.x, scales)]
        fit = _PairedFit(self, data, xs, n_latents, device) if data.paired is not None else \
            _UnpairedFit(self, data, xs, n_latents, device)
        per_epoch = math.ceil(fit.n_train / p.batch_size)
        total = budget_steps(p, per_epoch, n_latents)
        lr = p.lr or auto_lr(n_latents, total)
        warmup = p.warmup_steps if p.warmup_steps is not None else min(1000, total // 20)
        trainer = fit.trainer(lr, total, warmup)
        losses = torch.empty(total)
        t0 = time.perf_counter()
        with tqdm(total=total, desc=f"crosscoder {layer}", unit="step", leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            for step, batch in zip(range(total), fit.batches()):
                losses[step] = fit.step(trainer, batch).item()
                bar.update(1)
        seconds = time.perf_counter() - t0
        result = fit.evaluate(trainer)
        norms = np.asarray(result["decoder_norm"])
        strength = np.asarray(result["mean_activation"]) * norms * aligned(
            fit.slices(), result["mean_activation"], scales, p.same_direction)
        freq = np.asarray(result["frequency"])
        fired = freq * np.asarray([len(x) for x in data.x])[None, :]
        live = (freq.max(1) >= max(p.min_frequency, 1e-12)) & (fired.max(1) >= p.min_rows)
        life = lifetimes(strength, data.labels, live, p.alive_fraction, p.absent_fraction)
        result.update(life)
        result["strength"] = np.round(strength, 6).tolist()
        flat, drop = loss_flat(losses)
        every = max(1, total // 100)
        curve = [[i + 1, round(float(v), 6)] for i, v in enumerate(losses.tolist())
                 if (i + 1) % every == 0]
        result.update(
            steps=data.labels, groups=data.groups, pairing=data.pairing,
            paired_inputs=None if data.paired is None else int(len(data.paired)),
            rows_per_group=[int(len(x)) for x in data.x], input_scale=scales,
            architecture="topk", k=p.k, d_in=d, n_latents=n_latents, converged=flat,
            dead_fraction=float((freq.max(1) == 0).mean()),
            train={"steps": total, "rows": fit.n_train, "seconds": seconds, "lr": lr,
                   "lr_auto": p.lr is None, "warmup_steps": warmup,
                   "budget": budget_rule(p, per_epoch, total, n_latents),
                   "loss_curve": curve, "final_loss": curve[-1][1] if curve else None,
                   "plateau_drop": drop, "device": str(device)})
        result["warnings"] = sae_warnings(result, p, SimpleNamespace(
            n_train=fit.n_train, n_available=data.available))
        if data.pairing == "unpaired":
            result["warnings"] += _unpaired_warnings(data)
        result["top_activations"] = fit.examples(life["born_late"][: p.top_latents],
                                                 life["birth_step"])
        result["weights_path"] = result["config_path"] = result["saelens_path"] = None
        if ctx.out_dir is not None and p.save_weights:
            fit.save(ctx, layer, scales, result)
        log.info("crosscoder %s (%s, %d groups): explained variance %.3f, %d shared, %d born, "
                 "%d died (%d steps, %.1fs)%s", layer, data.pairing, groups,
                 result["explained_variance"], life["counts"]["shared"],
                 life["counts"]["born"] + life["counts"]["transient"],
                 life["counts"]["died"] + life["counts"]["transient"], total, seconds,
                 "".join(f"; WARNING {w}" for w in result["warnings"]))
        return _json_safe(result)


# --- the two forms --------------------------------------------------------------------------------
class _PairedFit:
    """The acausal crosscoder on inputs seen at every group: an SAE over ``G * d`` features."""

    def __init__(self, owner: Crosscoder, data: StepRows, xs: list[torch.Tensor],
                 n_latents: int, device: torch.device):
        self.p: CrosscoderParams = owner.params
        self.data, self.device, self.G, self.d = data, device, len(xs), data.d
        assert data.paired is not None
        pairs = torch.as_tensor(data.paired)
        self.X = torch.cat([xs[g][pairs[:, g].to(device)] for g in range(self.G)], 1)
        gen = torch.Generator().manual_seed(self.p.seed)
        perm = torch.randperm(len(self.X), generator=gen)
        n_hold = max(1, round(self.p.holdout_fraction * len(self.X)))
        self.held, self.train_idx = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        self.n_train = len(self.train_idx)
        self.sae = SparseAutoencoder(self.G * self.d, n_latents, "topk", self.p.k,
                                     generator=gen).to(device)

    def trainer(self, lr: float, total: int, warmup: int) -> SAETrainer:
        p = self.p
        self.sae.init_from_data(self.X[self.train_idx[:65536]], True, "mean")
        aux_k = min(self.d // 2 if p.aux_k is None else p.aux_k, self.sae.n_latents)
        return SAETrainer(self.sae, lr, 0.0, aux_k, p.aux_coefficient, p.dead_steps_threshold,
                          total_steps=total, warmup_steps=warmup)

    def batches(self) -> Iterator[torch.Tensor]:
        for epoch in range(10 ** 9):
            g = torch.Generator().manual_seed(self.p.seed + 7919 * (epoch + 1))
            order = self.train_idx[torch.randperm(self.n_train, generator=g)]
            for i in range(0, len(order), self.p.batch_size):
                yield self.X[order[i:i + self.p.batch_size].to(self.device)]

    def step(self, trainer: Any, batch: Any) -> torch.Tensor:
        return trainer.step(batch)

    def slices(self) -> torch.Tensor:
        """Decoder slices [n, G, d] in the scaled units of each group."""
        return (self.sae.W_dec / float(self.sae.input_scale)).view(-1, self.G, self.d).detach()

    @torch.no_grad()
    def evaluate(self, trainer: Any) -> dict[str, Any]:
        sae = self.sae.eval()
        n, G, d = sae.n_latents, self.G, self.d
        counts = torch.zeros(n, device=self.device)
        sums = torch.zeros(n, device=self.device)
        for i in range(0, len(self.X), 4096):
            z = sae.encode(self.X[i:i + 4096])
            counts += (z > 0).sum(0)
            sums += z.sum(0)
        held = self.X[self.held.to(self.device)]
        z = sae.encode(held)
        rec = sae.decode(z)
        err = (held - rec).view(len(held), G, d)
        var = (held - held.mean(0)).view(len(held), G, d)
        s = float(sae.input_scale)
        norms = (sae.W_dec / s).view(n, G, d).norm(dim=-1)
        m = len(self.X)
        return {"explained_variance": 1 - float(err.pow(2).sum() / var.pow(2).sum().clamp_min(
                    1e-30)),
                "explained_variance_per_group": (1 - err.pow(2).sum((0, 2)) / var.pow(2).sum(
                    (0, 2)).clamp_min(1e-30)).tolist(),
                "l0": float((z > 0).sum(1).float().mean()), "eval_rows": len(held),
                "decoder_norm": norms.cpu().numpy().round(6).tolist(),
                "frequency": (counts / m)[:, None].expand(n, G).cpu().numpy().tolist(),
                "mean_activation": (sums / m)[:, None].expand(n, G).cpu().numpy().tolist()}

    @torch.no_grad()
    def examples(self, latents: list[int], births: list[Optional[int]]
                 ) -> Optional[dict[str, Any]]:
        """Top inputs of each latent, as the row of the group where it was born."""
        if not latents:
            return None
        idx = torch.as_tensor(latents, device=self.device)
        codes = torch.cat([self.sae.encode(self.X[i:i + 4096])[:, idx]
                           for i in range(0, len(self.X), 4096)]).cpu()
        assert self.data.paired is not None
        labels = self.data.labels
        table = []
        for j, latent in enumerate(latents):
            born = births[latent]
            g = labels.index(born) if born is not None else 0
            rows = self.data.paired[:, g]
            table.append([(float(codes[r, j]), self.data.where[g][rows[r]]) for r in
                          _top(codes[:, j], self.p.k_examples)])
        return _table(latents, table)

    def save(self, ctx: Context, layer: str, scales: list[float], result: dict[str, Any]) -> None:
        assert ctx.out_dir is not None
        sae, G, d, n = self.sae, self.G, self.d, self.sae.n_latents
        f = sae.folded_state()                       # acts on the scaled, concatenated rows
        sc = torch.as_tensor(scales, dtype=torch.float32, device=f["W_enc"].device)
        w_enc = f["W_enc"].view(G, d, n) * sc[:, None, None]
        w_dec = f["W_dec"].view(n, G, d) / sc[None, :, None]
        b_dec = f["b_dec"].view(G, d) / sc[:, None]
        _write(ctx, layer, {"W_enc": w_enc, "b_enc": f["b_enc"], "W_dec": w_dec, "b_dec": b_dec},
               "paired", self.data, self.p, result)
        raw = SparseAutoencoder(G * d, n, "topk", self.p.k)
        raw.load_state_dict({"W_enc": w_enc.reshape(G * d, n), "b_enc": f["b_enc"],
                             "W_dec": w_dec.reshape(n, G * d), "b_dec": b_dec.reshape(-1),
                             "threshold": torch.zeros(n), "input_scale": torch.tensor(1.0)})
        lens = f"crosscoder/saelens/{safe_name(layer)}"
        save_saelens(raw, ctx.out_dir / lens, hook_name=layer, metadata={
            "crosscoder_steps": self.data.groups, "crosscoder_input":
            "concatenation of the layer's activations of one input at each step group"})
        result["saelens_path"] = lens


class _UnpairedFit:
    """Rows of each group: shared encoder, one decoder slice per group."""

    def __init__(self, owner: Crosscoder, data: StepRows, xs: list[torch.Tensor],
                 n_latents: int, device: torch.device):
        self.p: CrosscoderParams = owner.params
        self.data, self.xs, self.device, self.G, self.d = data, xs, device, len(xs), data.d
        self.train_idx, self.held = data.split(self.p.holdout_fraction, self.p.seed)
        self.X = torch.cat([xs[g][self.train_idx[g].to(device)] for g in range(self.G)])
        self.g = torch.cat([torch.full((len(t),), g, dtype=torch.long)
                            for g, t in enumerate(self.train_idx)]).to(device)
        self.n_train = len(self.X)
        gen = torch.Generator().manual_seed(self.p.seed)
        self.model = StepCrosscoder(self.d, self.G, n_latents, self.p.k, generator=gen).to(device)

    def trainer(self, lr: float, total: int, warmup: int) -> StepTrainer:
        gen = torch.Generator().manual_seed(self.p.seed + 1)
        pick = torch.randperm(self.n_train, generator=gen)[:65536].to(self.device)
        self.model.init_from_data(self.X[pick], self.g[pick])
        return StepTrainer(self.model, lr, dead_steps_threshold=self.p.dead_steps_threshold,
                           total_steps=total, warmup_steps=warmup)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in range(10 ** 9):
            g = torch.Generator().manual_seed(self.p.seed + 7919 * (epoch + 1))
            order = torch.randperm(self.n_train, generator=g).to(self.device)
            for i in range(0, len(order), self.p.batch_size):
                pick = order[i:i + self.p.batch_size]
                yield self.X[pick], self.g[pick]

    def step(self, trainer: Any, batch: Any) -> torch.Tensor:
        return trainer.step_rows(*batch)

    def slices(self) -> torch.Tensor:
        """Decoder slices [n, G, d] in the scaled units of each group."""
        return self.model.slices().detach()

    @torch.no_grad()
    def evaluate(self, trainer: Any) -> dict[str, Any]:
        m = self.model.eval()
        n = m.n_latents
        freq, mean, ev = [], [], []
        err = var = 0.0
        l0, held_rows = 0.0, 0
        for g, x in enumerate(self.xs):
            gid = torch.full((len(x),), g, dtype=torch.long, device=self.device)
            counts = torch.zeros(n, device=self.device)
            sums = torch.zeros(n, device=self.device)
            for i in range(0, len(x), 4096):
                z = m.encode(x[i:i + 4096], gid[i:i + 4096])
                counts += (z > 0).sum(0)
                sums += z.sum(0)
            freq.append(counts / max(len(x), 1))
            mean.append(sums / max(len(x), 1))
            h = x[self.held[g].to(self.device)]
            hid = gid[: len(h)]
            z = m.encode(h, hid)
            e, v = float((h - m.decode(z, hid)).pow(2).sum()), float((h - h.mean(0)).pow(2).sum())
            ev.append(1 - e / max(v, 1e-30))
            err, var = err + e, var + v
            l0 += float((z > 0).sum())
            held_rows += len(h)
        return {"explained_variance": 1 - err / max(var, 1e-30),
                "explained_variance_per_group": ev, "l0": l0 / max(held_rows, 1),
                "eval_rows": held_rows,
                "decoder_norm": m.slices().norm(dim=-1).cpu().numpy().round(6).tolist(),
                "frequency": torch.stack(freq, 1).cpu().numpy().tolist(),
                "mean_activation": torch.stack(mean, 1).cpu().numpy().tolist()}

    @torch.no_grad()
    def examples(self, latents: list[int], births: list[Optional[int]]
                 ) -> Optional[dict[str, Any]]:
        """Top rows of each latent among the rows of the groups from its birth on."""
        if not latents:
            return None
        idx = torch.as_tensor(latents, device=self.device)
        labels = self.data.labels
        codes, where = [], []
        for g, x in enumerate(self.xs):
            gid = torch.full((len(x),), g, dtype=torch.long, device=self.device)
            codes.append(torch.cat([self.model.encode(x[i:i + 4096], gid[i:i + 4096])[:, idx]
                                    for i in range(0, len(x), 4096)]).cpu())
            where += [(labels[g], w) for w in self.data.where[g]]
        c = torch.cat(codes)
        table = []
        for j, latent in enumerate(latents):
            born = labels[0] if births[latent] is None else int(births[latent] or 0)
            col = torch.where(torch.as_tensor([lab >= born for lab, _ in where]), c[:, j],
                              torch.zeros(()))
            table.append([(float(col[r]), where[r][1]) for r in _top(col, self.p.k_examples)])
        return _table(latents, table)

    def save(self, ctx: Context, layer: str, scales: list[float], result: dict[str, Any]) -> None:
        m, G = self.model, self.G
        sc = torch.as_tensor(scales, dtype=torch.float32, device=m.W_enc.device)
        w_enc = m.W_enc.detach()[None] * sc[:, None, None]
        _write(ctx, layer, {"W_enc": w_enc, "b_enc": m.b_enc.detach(),
                            "W_dec": m.slices().detach() / sc[None, :, None],
                            "b_dec": m.bias().detach() / sc[:, None]}, "unpaired", self.data,
               self.p, result)
        assert w_enc.shape[0] == G


# --- helpers --------------------------------------------------------------------------------------
@torch.no_grad()
def aligned(w: torch.Tensor, mean_activation: Any, scales: list[float],
            same_direction: float) -> np.ndarray:
    """How much of each group's slice is the latent's feature: ``cos(W_dec^g_i, W_dec^ref_i)``
    where it is at least ``same_direction``, else 0.

    ``w`` [n, G, d] are the slices in each group's scaled units (``scales``), the reference
    ``ref`` the group of the largest ``mean_activation * ||W_dec^g_i|| / scale_g``: the peak in
    the activations' own units, common to all steps.  Why: a paired latent is one input's code
    at every group, so before its feature forms its slice reconstructs whatever that input's
    row was then (an untrained token's initial vector), pointing elsewhere; an unpaired latent
    trains each group's slice on that group's rows only and may turn to another feature once
    its own is gone.  Why the peak in raw units: each group is scaled to the same mean norm,
    which blows a checkpoint near initialisation (activations small, every input a random
    vector of the same size) up to full size, so there an untrained vector can be a latent's
    largest slice in scaled units and would become the direction every later step is judged
    against."""
    sc = torch.as_tensor(scales, dtype=w.dtype, device=w.device)
    norms = w.norm(dim=-1)
    raw = torch.as_tensor(np.asarray(mean_activation), dtype=w.dtype, device=w.device) * \
        norms / sc[None, :]
    ref = w[torch.arange(len(w), device=w.device), raw.argmax(1)]
    cos = torch.nn.functional.cosine_similarity(w, ref[:, None, :], dim=-1)
    return torch.where(cos >= same_direction, cos, torch.zeros(())).cpu().numpy()


def budget_of(p: StepDictParams, w: Workload) -> tuple[float, float, float, float, int, int]:
    """What a fit of these (validated, complete) params would do on workload ``w``, for the
    cost estimates of ``crosscoder`` and ``sae_tracking``: rows, width, latents, step groups,
    batch size and optimizer steps per group."""
    n, d = float(w.rows), float(w.d)
    latents = float(p.n_latents or p.expansion_factor * d)
    groups = float(max(1, min(w.steps, p.step_groups or w.steps)))
    size = int(p.batch_size)
    steps = budget_steps(p, -(-int(n / groups) // size), int(latents))
    return n, d, latents, groups, size, steps


def _check_sizes(p: StepDictParams, d: int, groups: int, n_latents: int) -> None:
    problems = []
    if n_latents > MAX_LATENTS:
        problems.append(f"n_latents={n_latents} exceeds {MAX_LATENTS}; lower expansion_factor")
    if n_latents * d * groups > MAX_PARAMETERS:
        problems.append(f"n_latents*d*groups={n_latents * d * groups} exceeds {MAX_PARAMETERS} "
                        f"decoder weights; lower expansion_factor or set step_groups")
    if p.k > n_latents:
        problems.append(f"k={p.k} exceeds n_latents={n_latents}; lower k or raise "
                        f"expansion_factor")
    if problems:
        raise AnalysisParamsError(f"bad parameters for analysis 'crosscoder': "
                                  f"{'; '.join(problems)}")


def _unpaired_warnings(data: StepRows) -> list[str]:
    return [f"no inputs were captured at every step group (pairing={data.pairing!r}): the "
            f"crosscoder was trained on each step's own rows, so a latent's strength at a step "
            f"also moves with how often its feature occurs in that step's batches; capture a "
            f"fixed probe batch (MechIntCallback(config, probe_inputs=x)) for paired steps"]


def _top(col: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(-col, stable=True)[:k].tolist()
    return [r for r in order if col[r] > 0]


def _table(latents: list[int], table: list[list[tuple[float, tuple[str, int, int]]]]
           ) -> dict[str, Any]:
    """The ``{"latents", "values", "shard", "row", "step"}`` table that contexts fills."""
    return {"latents": latents, "k": max((len(t) for t in table), default=0),
            "values": [[v for v, _ in t] for t in table],
            "shard": [[w[0] for _, w in t] for t in table],
            "row": [[w[1] for _, w in t] for t in table],
            "step": [[w[2] for _, w in t] for t in table]}


def _write(ctx: Context, layer: str, tensors: dict[str, torch.Tensor], mode: str,
           data: StepRows, p: CrosscoderParams, result: dict[str, Any]) -> None:
    assert ctx.out_dir is not None
    rel = f"crosscoder/{safe_name(layer)}.safetensors"
    save_crosscoder(ctx.out_dir / rel, tensors, {
        "layer": layer, "mode": mode, "groups": data.groups, "steps": data.labels,
        "k": p.k, "d_in": data.d, "n_latents": int(tensors["b_enc"].shape[0]),
        "params": p.model_dump(),
        "encode": "paired: z = topk(relu(sum_g (x_g - b_dec[g]) @ W_enc[g] + b_enc), k); "
                  "unpaired (row of group g): z = topk(relu((x - b_dec[g]) @ W_enc[g] + b_enc), k)",
        "decode": "x_hat_g = z @ W_dec[:, g] + b_dec[g]"})
    result["weights_path"] = rel
    result["config_path"] = rel[: -len(".safetensors")] + ".json"
