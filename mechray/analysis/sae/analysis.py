"""``sae``: a sparse autoencoder per layer, trained by streaming the layer's shards.

Usage::

    from mechray.analysis import get_analysis, Context

    sae = get_analysis("sae", {"k": 32, "expansion_factor": 8})   # the rest is chosen for you
    result = sae.fit(Context(store=ShardStore("./mechint_cache"), out_dir=Path("results"),
                             model=model, eval_data=inputs), "popt")
    result["explained_variance"], result["l0"], result["converged"], result["warnings"]
    result["weights_path"]    # "sae/popt.safetensors"; result["saelens_path"]: "sae/saelens/popt"
    # later: mechray.analysis.sae.model.load_sae("results/sae/popt.safetensors").encode(x)
    #        or sae_lens.SAE.load_from_disk("results/sae/saelens/popt")
    get_analysis("sae", {"pretrained": "path/to/saelens_dir"}).fit(ctx, "popt")  # no training

Budget, lr, schedule and the verdict (``converged``, ``warnings``):
:mod:`mechray.analysis.sae.budget`.  The training step (sparse for TopK/BatchTopK, JumpReLU's
thresholds, SAELens' dead count ``dead_saelens``): :mod:`mechray.analysis.sae.train`.
Resuming an interrupted fit (``checkpoint_every``): :mod:`mechray.analysis.sae.checkpoint`.
One SAE on several Ray Train workers (``num_workers``): :mod:`mechray.analysis.sae.distributed`.
Top-activating rows per latent (``top_activations``): :mod:`mechray.analysis.sae.examples`.

Data: every shard is split once, deterministically from ``seed`` and its file name, into training
rows and ``holdout_fraction`` held-out rows (at most ``max_eval_rows`` in all).  A layer whose
training rows fit in ``buffer_mb`` is read once and kept in memory (on the training device) for
all epochs; a larger one is streamed shard by shard through a shuffle buffer that mixes rows
across shards (peak memory about ``buffer_mb`` either way).  ``max_rows`` caps the training rows
read.  ``device='auto'`` trains on CUDA when this process sees a GPU.

Result keys (held-out rows, raw activation units): ``mse`` (mean squared error per element),
``mse_mean_baseline`` (predicting the held-out mean), ``explained_variance`` (1 - FVU), ``l0``
(active latents per row), ``dead_fraction`` (latents active neither on held-out rows nor in the
last ``dead_steps_threshold`` training steps; ``dead_saelens``: SAELens' count),
``cosine_similarity`` (mean cos(x, x_hat)), ``l2_ratio`` (shrinkage: mean ||x_hat|| / ||x||),
``n_latents``, ``latent_log10_frequency`` (per latent, ``null`` when never active),
``latent_density_histogram``, ``train_explained_variance`` (on as many training rows as are
held out: memorisation shows as a gap), ``train`` (steps, rows, loss curve, budget,
``max_epochs``, ``early_stop`` (held-out FVU curve, stop step and reason),
``resumed_from_step``, ...; ``None`` for ``pretrained``), ``converged``, ``warnings``, ``trained``,
``pretrained``, ``top_activations``, ``splice`` (see :func:`splice_metrics`) and
``weights_path`` / ``config_path`` / ``saelens_path`` (relative to ``ctx.out_dir``; ``None``
without one).  Formulas and file layout:
:mod:`mechray.analysis.sae.model`.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from mechray._util import json_safe, safe_name  # noqa: F401  (safe_name: also from here)
from mechray.analysis.base import (
    JSON_NUMBER,
    Analysis,
    AnalysisParamsError,
    Context,
    Cost,
    Skip,
    Workload,
    register,
)
from mechray.analysis.intervene import (
    eval_inputs,
)
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
from mechray.analysis.sae.checkpoint import Checkpoint
from mechray.analysis.sae.evaluate import evaluate, splice_metrics
from mechray.analysis.sae.examples import report_examples, top_activations
from mechray.analysis.sae.model import (
    SparseAutoencoder,
    load_sae,
    load_saelens,
    save_sae,
    save_saelens,
)
from mechray.analysis.sae.params import (
    MAX_CODE_ELEMENTS,
    MAX_LATENTS,
    MAX_PARAMETERS,
    SAEParams,
)
from mechray.analysis.sae.rows import LayerRows
from mechray.analysis.sae.train import SAETrainer, dead_saelens

log = logging.getLogger(__name__)
@register
class SAEAnalysis(Analysis):
    """Trains one sparse autoencoder per layer (kind ``fit``) and evaluates it on held-out rows."""

    name = "sae"
    kind = "fit"
    Params = SAEParams
    summary = "a sparse autoencoder per layer (TopK, BatchTopK or ReLU+L1), held-out metrics"
    columns = (("l0", lambda r: r["l0"]), ("explained variance", lambda r: r["explained_variance"]),
               ("converged", lambda r: "pretrained (no training)" if r.get("trained") is False
                else r.get("converged")),
               ("steps", lambda r: r["train"]["steps"]),
               ("warnings", lambda r: len(r["warnings"])),
               ("mse", lambda r: r["mse"]), ("dead fraction", lambda r: r["dead_fraction"]),
               ("latents", lambda r: r.get("n_latents")),
               ("weights", lambda r: r.get("weights_path")))
    plot_file = "sae_latent_density.png"

    @staticmethod
    def plot(per: dict, plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for layer, r in per.items():
            freq = [f for f in r.get("latent_log10_frequency") or [] if f is not None]
            if freq:
                ax.hist(freq, bins=30, histtype="step", label=layer)
                drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax.set(xlabel="log10 latent firing frequency", ylabel="latents",
               title="SAE latent density")
        ax.legend(fontsize=7)
        return fig

    @staticmethod
    def report_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Markdown under the table: top-activating rows of the listed latents."""
        return report_examples(rows)

    @classmethod
    def answer_bytes(cls, p: SAEParams, w: Workload) -> float:
        latents = float(p.n_latents or p.expansion_factor * w.d)
        return JSON_NUMBER * latents * 4 + 65536      # a few statistics per latent

    @classmethod
    def task_cpus(cls, p: SAEParams, default: float) -> float:
        """With ``num_workers > 1`` the fit task only waits on its Ray Train workers: it holds
        no CPU (each layer's trainer reserves its workers whole, so layers queue, never
        deadlock)."""
        return 0.0 if p.num_workers > 1 else default

    @classmethod
    def cost(cls, p: SAEParams, w: Workload) -> Cost:
        n, d = float(w.rows), float(w.d)
        latents = float(p.n_latents or p.expansion_factor * d)
        rows = float(min(n, p.max_rows or n))
        size = p.batch_size
        steps = budget_steps(p, -(-int(rows) // size), int(latents))
        seen = 0.0 if p.pretrained else steps * size
        seen += n / 3                           # top-activating rows: one forward pass
        batch = float(min(size, max(rows, 1)))
        buffer = min(rows * d * 4, p.buffer_mb * 2 ** 20)
        return Cost(6 * seen * latents * d, latents * d * 4 * 5 + batch * latents * 4 * 4 + buffer)

    def fit(self, ctx: Context, layer: str) -> dict[str, Any]:
        p: SAEParams = self.params
        if ctx.store is None:
            raise Skip("sae needs stored shards of the layer (no store was given)")
        device = _device(p.device)
        if p.pretrained is not None:
            return self._evaluate_pretrained(ctx, layer, device)
        if p.num_workers > 1:
            from mechray.analysis.sae.distributed import fit_distributed

            return fit_distributed(self, ctx, layer, device)
        data = LayerRows(ctx.store, layer, p, device)
        d = data.d
        n_latents = p.n_latents or p.expansion_factor * d
        self._check_sizes(d, n_latents)
        per_epoch = data.steps_per_epoch()
        total = budget_steps(p, per_epoch, n_latents)
        lr = p.lr or auto_lr(n_latents, total)
        warmup = p.warmup_steps if p.warmup_steps is not None else min(1000, total // 20)
        gen = torch.Generator().manual_seed(p.seed)
        sae = SparseAutoencoder(d, n_latents, p.architecture, p.k, generator=gen).to(device)
        aux_k = min(d // 2 if p.aux_k is None else p.aux_k, n_latents)
        trainer = SAETrainer(sae, lr, p.l1_coefficient, aux_k, p.aux_coefficient,
                             p.dead_steps_threshold, total_steps=total, warmup_steps=warmup,
                             l0_coefficient=p.l0_coefficient, bandwidth=p.jumprelu_bandwidth)
        losses = torch.empty(total, device=device)
        ckpt = self._checkpoint(ctx, layer, data)
        resumed = ckpt.restore(trainer, total) if ckpt is not None else None
        rows_seen, before = 0, 0.0
        batches = data.batches(None)
        if resumed is not None:
            done, rows_seen, before = resumed
            losses[: len(done)] = done.to(device)
            for _ in itertools.islice(batches, trainer.n_steps):   # the batches already seen
                pass
        watch = early_stopping(p) and data.in_memory
        stop: Optional[EarlyStop] = None
        t0 = time.perf_counter()
        with tqdm(total=total, initial=trainer.n_steps, desc=f"sae {layer}", unit="step",
                  leave=False, disable=not sys.stderr.isatty()) as bar:
            for batch in itertools.islice(batches, max(0, total - trainer.n_steps)):
                if trainer.n_steps == 0 and data.sample is not None:
                    sae.init_from_data(data.sample, p.normalize_input, p.b_dec_init)
                step = trainer.n_steps
                losses[step] = trainer.step(batch)
                rows_seen += len(batch)
                bar.update(1)
                if watch and stop is None:      # the held-out rows are split off by now
                    stop = EarlyStop(data.eval_rows(), p.eval_every or max(5, total // 20),
                                     start=max(warmup, total // 5, min(FEW_STEPS, total)))
                if stop is not None and stop.check(sae, trainer.n_steps):
                    break
                if ckpt is not None and trainer.n_steps % p.checkpoint_every == 0 and \
                        trainer.n_steps < total:
                    ckpt.save(trainer, losses[: trainer.n_steps], rows_seen,
                              before + time.perf_counter() - t0)
        seconds = before + time.perf_counter() - t0
        losses = losses[: trainer.n_steps].cpu()
        if stop is not None:
            stop.restore(sae)
        sae.eval()
        if p.architecture == "batchtopk" and data.sample is not None:
            sae.calibrate_threshold(data.sample[: p.max_eval_rows])
        window = min(p.dead_steps_threshold, trainer.n_steps)
        held = data.eval_rows()
        result = evaluate(sae, held, trainer.steps_since_fired >= window, p.batch_size)
        result.update(architecture=p.architecture, d_in=d, n_latents=n_latents,
                      k=None if p.architecture == "relu" else p.k, trained=True, pretrained=None,
                      dead_saelens=dead_saelens(trainer))
        if data.sample is not None:     # training rows, as many as held out: memorisation
            result["train_explained_variance"] = 1 - fvu(sae, data.sample[: len(held)])
        every = max(1, trainer.n_steps // 100)
        curve = [[i + 1, round(float(v), 6)] for i, v in enumerate(losses.tolist())
                 if (i + 1) % every == 0]
        flat, drop = loss_flat(losses)
        result["train"] = {"steps": trainer.n_steps, "epochs": data.epoch + 1,
                           "rows_seen": rows_seen, "seconds": seconds,
                           "rows_per_second": rows_seen / max(seconds, 1e-9),
                           "lr": lr, "lr_auto": p.lr is None, "warmup_steps": warmup,
                           "budget": budget_rule(p, per_epoch, total, n_latents), "training_rows":
                           data.n_train, "aux_k": aux_k, "device": str(device),
                           "in_memory": data.in_memory, "loss_curve": curve,
                           "final_loss": curve[-1][1] if curve else None,
                           "plateau_drop": drop, "resumed_from_step":
                           None if resumed is None else len(resumed[0]),
                           "max_epochs": p.max_epochs,
                           "early_stop": None if stop is None else stop.summary()}
        if p.architecture == "batchtopk":
            result["train"]["threshold"] = float(sae.threshold.max())
        result["converged"] = flat or (stop is not None and stop.plateaued() is True)
        result["warnings"] = sae_warnings(result, p, data)
        result["top_activations"] = top_activations(sae, ctx.store, layer, result, p)
        result["splice"] = self._splice(sae, ctx, layer)
        result["weights_path"] = result["config_path"] = result["saelens_path"] = None
        if ctx.out_dir is not None and p.save_weights:
            self._save(sae, ctx, layer, result)
        if ckpt is not None:
            ckpt.remove()
        log.info("sae %s: explained variance %.3f, l0 %.1f, dead %.3f (%d steps, %.1fs)%s",
                 layer, result["explained_variance"], result["l0"], result["dead_fraction"],
                 trainer.n_steps, seconds, "".join(f"; WARNING {w}" for w in result["warnings"]))
        return json_safe(result)

    def _save(self, sae: SparseAutoencoder, ctx: Context, layer: str,
              result: dict[str, Any]) -> None:
        assert ctx.out_dir is not None
        rel = f"sae/{safe_name(layer)}.safetensors"
        save_sae(sae, ctx.out_dir / rel, {"layer": layer, "params": self.params.model_dump()})
        result["weights_path"] = rel
        result["config_path"] = rel[: -len(".safetensors")] + ".json"
        lens = f"sae/saelens/{safe_name(layer)}"
        save_saelens(sae, ctx.out_dir / lens, hook_name=layer,
                     metadata={"explained_variance": result["explained_variance"],
                               "l0": result["l0"]})
        result["saelens_path"] = lens

    def _evaluate_pretrained(self, ctx: Context, layer: str, device: torch.device
                             ) -> dict[str, Any]:
        """Metrics, latent frequencies and top-activating rows of a saved SAE; no training."""
        p: SAEParams = self.params
        path = Path(str(p.pretrained)).expanduser()
        hook: Optional[str] = None
        arch: Optional[str] = None
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            sae, fmt = load_sae(path), "mechray"
        else:
            (sae, cfg), fmt = load_saelens(path), "saelens"
            hook, arch = (cfg.get("metadata") or {}).get("hook_name"), cfg.get("architecture")
        sae = sae.to(device).eval()
        data = LayerRows(ctx.store, layer, p, device)
        if data.d != sae.d_in:
            raise AnalysisParamsError(f"pretrained={str(path)!r} has d_in={sae.d_in} but layer "
                                      f"{layer!r} has {data.d} features; evaluate it on the "
                                      f"layer it was trained on (hook_name={hook!r})")
        held = data.eval_rows()
        result = evaluate(sae, held, torch.ones(sae.n_latents, dtype=torch.bool), p.batch_size)
        result.update(architecture=sae.architecture, d_in=sae.d_in, n_latents=sae.n_latents,
                      k=sae.k if sae.architecture in ("topk", "batchtopk") else None,
                      trained=False, train=None, converged=None,
                      pretrained={"path": str(path), "format": fmt,
                                  "saelens_architecture": arch, "hook_name": hook})
        warnings = sae_warnings(result, p, data)
        if hook is not None and hook != layer:
            warnings.append(f"the SAE's hook_name {hook!r} is not the layer {layer!r} it was "
                            f"evaluated on; check that they are the same activation")
        result["warnings"] = warnings
        result["top_activations"] = top_activations(sae, ctx.store, layer, result, p)
        result["splice"] = self._splice(sae, ctx, layer)
        result["weights_path"] = result["config_path"] = result["saelens_path"] = None
        log.info("sae %s: pretrained %s evaluated (no training): explained variance %.3f, l0 "
                 "%.1f%s", layer, path, result["explained_variance"], result["l0"],
                 "".join(f"; WARNING {w}" for w in warnings))
        return json_safe(result)

    def _checkpoint(self, ctx: Context, layer: str, data: LayerRows) -> Optional[Checkpoint]:
        p: SAEParams = self.params
        root = ctx.checkpoint_dir or ctx.out_dir
        if root is None or not p.checkpoint_every:
            return None
        info = ctx.store.layers()[layer]
        spec = {"params": p.model_dump(exclude={"checkpoint_every", "top_latents", "latents",
                                                "k_examples", "splice_max_inputs",
                                                "save_weights"}),
                "layer": layer, "rows": info["rows"], "shards": info["shards"], "d": data.d,
                "n_train": data.n_train}
        return Checkpoint(Path(root) / "sae" / "checkpoints" / safe_name(layer), spec)

    def _check_sizes(self, d: int, n_latents: int) -> None:
        p = self.params
        problems = []
        if n_latents > MAX_LATENTS:
            problems.append(f"n_latents={n_latents} (expansion_factor={p.expansion_factor} x "
                            f"d={d}) exceeds {MAX_LATENTS}; lower expansion_factor or set "
                            f"n_latents")
        if n_latents * d > MAX_PARAMETERS:
            problems.append(f"n_latents*d={n_latents * d} exceeds {MAX_PARAMETERS} weights; "
                            f"lower expansion_factor / n_latents")
        if p.batch_size * n_latents > MAX_CODE_ELEMENTS:
            problems.append(f"batch_size*n_latents={p.batch_size * n_latents} exceeds "
                            f"{MAX_CODE_ELEMENTS}; lower batch_size")
        if p.architecture in ("topk", "batchtopk") and p.k > n_latents:
            problems.append(f"k={p.k} exceeds n_latents={n_latents}; lower k or raise "
                            f"expansion_factor")
        if n_latents > MAX_LATENTS or n_latents * d > MAX_PARAMETERS:
            from mechray.analysis.sae.distributed import memory_per_worker

            need = memory_per_worker(d, n_latents, p.batch_size, p.num_workers) / 2 ** 30
            problems.append(f"an SAE of d={d} x n_latents={n_latents} needs ~{need:.1f} GiB per "
                            f"worker and would need its latents sharded across workers, which "
                            f"mechray does not support yet (num_workers only splits the rows)")
        if problems:
            raise AnalysisParamsError(f"bad parameters for analysis 'sae': {'; '.join(problems)}")

    def _splice(self, sae: SparseAutoencoder, ctx: Context, layer: str) -> dict[str, Any]:
        try:
            inputs = eval_inputs(ctx, self.params.splice_max_inputs)
            if ctx.model is None:
                raise Skip("no model to splice into")
            return splice_metrics(sae, ctx.model, layer, inputs)
        except Skip as exc:
            return {"skipped": True, "reason": f"splice: {exc}"}
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            log.warning("sae %s: splice skipped: %s", layer, exc)
            return {"skipped": True, "reason": f"splice failed: {exc}"}


# --- helpers ----------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Skip(f"device={name!r} but CUDA is not available here; use device='auto' or 'cpu'")
    return torch.device(name)


