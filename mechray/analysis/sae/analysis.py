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
Several SAEs on one read of the rows (``sweep``, e.g. ``{"k": [16, 32, 64]}``):
:mod:`mechray.analysis.sae.sweep`.
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
from pathlib import Path
from typing import Any, Optional

import torch

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
    budget_steps,
    sae_warnings,
)
from mechray.analysis.sae.checkpoint import Checkpoint, checkpoint_root
from mechray.analysis.sae.evaluate import evaluate, splice_metrics
from mechray.analysis.sae.examples import report_examples, top_activations
from mechray.analysis.sae.fit import SAEFit, train_together
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
        """Markdown under the table: top-activating rows of the listed latents, and each
        sweep's comparison table."""
        from mechray.analysis.sae.sweep import report_sweeps

        return report_examples(rows) + report_sweeps(rows)

    @classmethod
    def answer_bytes(cls, p: SAEParams, w: Workload) -> float:
        if p.sweep:                                     # a result per setting
            return sum(cls.answer_bytes(q, w) for q in _sweep_params(p))
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
        if p.sweep:             # every SAE's work and memory (an upper bound: one read shared)
            costs = [cls.cost(q, w) for q in _sweep_params(p)]
            return Cost(sum(c.ops for c in costs), sum(c.bytes for c in costs))
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
        if p.sweep:
            from mechray.analysis.sae.sweep import fit_sweep

            return fit_sweep(self, ctx, layer, device)
        if p.num_workers > 1:
            from mechray.analysis.sae.distributed import fit_distributed

            return fit_distributed(self, ctx, layer, device)
        data = LayerRows(ctx.store, layer, p, device)
        run = SAEFit(self, ctx, layer, data, device)
        train_together([run], data, layer)
        result = run.result()
        result["top_activations"] = top_activations(run.trainer.sae, ctx.store, layer, result, p)
        result = run.finish(ctx, result)
        log.info("sae %s: explained variance %.3f, l0 %.1f, dead %.3f (%d steps, %.1fs)%s",
                 layer, result["explained_variance"], result["l0"], result["dead_fraction"],
                 result["train"]["steps"], result["train"]["seconds"],
                 "".join(f"; WARNING {w}" for w in result["warnings"]))
        return result

    def _save(self, sae: SparseAutoencoder, ctx: Context, layer: str,
              result: dict[str, Any], name: Optional[str] = None) -> None:
        """Weights as ``sae/<name>.safetensors`` and ``sae/saelens/<name>`` (``name``: the
        layer's file-safe name; a sweep's SAEs add their setting)."""
        assert ctx.out_dir is not None
        name = name or safe_name(layer)
        rel = f"sae/{name}.safetensors"
        save_sae(sae, ctx.out_dir / rel, {"layer": layer, "params": self.params.model_dump()})
        result["weights_path"] = rel
        result["config_path"] = rel[: -len(".safetensors")] + ".json"
        lens = f"sae/saelens/{name}"
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
        root = checkpoint_root(ctx)
        if root is None or not p.checkpoint_every:
            return None
        info = ctx.store.layers()[layer]
        spec = {"params": p.model_dump(exclude={"checkpoint_every", "top_latents", "latents",
                                                "k_examples", "splice_max_inputs",
                                                "save_weights"}),
                "layer": layer, "rows": info["rows"], "shards": info["shards"], "d": data.d,
                "n_train": data.n_train}
        where = f"{root}/sae/checkpoints/{safe_name(layer)}" if str(root).startswith("s3://") \
            else Path(root) / "sae" / "checkpoints" / safe_name(layer)
        return Checkpoint(where, spec, ctx.store)

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
def _sweep_params(p: SAEParams) -> list[SAEParams]:
    """The params of each setting of the sweep ``p`` (``sweep`` removed)."""
    grid = p.sweep or {}
    return [SAEParams(**{**p.model_dump(), **dict(zip(grid, values)), "sweep": None})
            for values in itertools.product(*grid.values())]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Skip(f"device={name!r} but CUDA is not available here; use device='auto' or 'cpu'")
    return torch.device(name)


