"""Several SAEs of one layer on one read of its rows: ``sae`` with ``sweep``.

Usage::

    sweep = get_analysis("sae", {"expansion_factor": 8, "sweep": {"k": [16, 32, 64]}})
    r = sweep.fit(ctx, "popt")                   # in this process, or num_workers > 1: Ray Train
    r["comparison"]        # a row per setting: explained variance, L0, dead fraction, ...
    r["results"]["k=32"]   # that SAE's full result, as a fit with k=32 alone would give it
    r["results"]["k=32"]["weights_path"]         # "sae/popt-k_32.safetensors"
    # mechray analyze ./store --analyses sae --params '{"sae": {"sweep": {"k": [16, 32, 64]}}}'

``sweep`` maps parameters to lists of values; the SAEs are every combination (at most
:data:`~mechray.analysis.sae.params.MAX_SWEEP`), each with the other parameters as given.  Only
what shapes the SAE and its optimiser may vary (:data:`~mechray.analysis.sae.params.SWEEPABLE`:
``k``, widths, sparsity coefficients, lr, ...), never what chooses the rows (``seed``,
``batch_size``, ``max_rows``, ``holdout_fraction``), so every SAE trains on the same batches in
the same order: each batch is read, decoded and shuffled once and fed to every SAE whose next
step it is (:func:`~mechray.analysis.sae.fit.train_together`; on Ray Train each worker does the
same with its shards, :mod:`~mechray.analysis.sae.distributed`).  An SAE with a smaller budget
or an early stop stops taking batches; the others go on.  The held-out rows, and the
top-activating rows of every SAE, come from that same read too.

Each SAE is the one a fit of its setting alone trains (the same seed, batches and steps: equal
bit for bit in this process, ``tests/analysis/test_sae_sweep.py``), with its own checkpoint (the
single fit's: a sweep resumes from a fit's checkpoint and the other way round), weights files
``sae/<layer>-<setting>.safetensors`` and SAELens directory, and result.  The layer's result::

    {"sweep": {"params": {...}, "settings": ["k=16", ...]},
     "results": {"k=16": {...}, ...},            # per setting, the single-fit layout
     "comparison": [{"setting": "k=16", "k": 16, "explained_variance": ..., "l0": ...,
                     "dead_fraction": ..., "n_latents": ..., "mse": ..., "steps": ...,
                     "converged": ..., "weights_path": ...}, ...],
     "converged": <all converged>, "warnings": ["k=16: ...", ...]}

The Markdown report shows the comparison table under the ``sae`` table.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import torch

from mechray._util import safe_name
from mechray.analysis.base import Context
from mechray.analysis.sae.examples import top_activations_each
from mechray.analysis.sae.fit import SAEFit, train_together
from mechray.analysis.sae.rows import LayerRows

if TYPE_CHECKING:
    from mechray.analysis.sae.analysis import SAEAnalysis
    from mechray.analysis.sae.params import SAEParams

log = logging.getLogger(__name__)
COMPARED = ("explained_variance", "l0", "dead_fraction", "n_latents", "mse")


class Setting:
    """One SAE of a sweep: its parameter values, label, file name and analysis."""

    def __init__(self, analysis: "SAEAnalysis", layer: str, values: dict[str, Any]):
        self.values = values
        self.label = ",".join(f"{key}={value}" for key, value in values.items())
        self.file = f"{safe_name(layer)}-{safe_name(self.label)}"
        params = {**analysis.params.model_dump(), **values, "sweep": None}
        self.analysis: SAEAnalysis = type(analysis)(params)


def settings(analysis: "SAEAnalysis", layer: str) -> list[Setting]:
    """The sweep's SAEs, every combination of its values in the order given."""
    p: SAEParams = analysis.params
    grid = p.sweep or {}
    return [Setting(analysis, layer, dict(zip(grid, values)))
            for values in itertools.product(*grid.values())]


def fit_sweep(analysis: "SAEAnalysis", ctx: Context, layer: str,
              device: torch.device) -> dict[str, Any]:
    """``analysis.fit(ctx, layer)`` for a sweep (module docstring)."""
    p: SAEParams = analysis.params
    sweep = settings(analysis, layer)
    results: list[dict[str, Any]]
    if p.num_workers > 1:
        from mechray.analysis.sae.distributed import fit_distributed

        results = fit_distributed(analysis, ctx, layer, device, sweep)
    else:
        data = LayerRows(ctx.store, layer, p, device)
        fits = [SAEFit(s.analysis, ctx, layer, data, device, name=s.file) for s in sweep]
        train_together(fits, data, layer)
        results = [f.result() for f in fits]
        tops = top_activations_each([(f.trainer.sae, r, f.p) for f, r in zip(fits, results)],
                                    ctx.store, layer)
        for result, top in zip(results, tops):
            result["top_activations"] = top
        results = [f.finish(ctx, r) for f, r in zip(fits, results)]
    return combine(p, sweep, results, layer)


def combine(p: "SAEParams", sweep: list[Setting], results: list[dict[str, Any]],
            layer: str) -> dict[str, Any]:
    """The layer's sweep result from each setting's result."""
    table = []
    for s, r in zip(sweep, results):
        row: dict[str, Any] = {"setting": s.label, **s.values}
        row.update({key: r.get(key) for key in COMPARED})
        row.update(steps=(r.get("train") or {}).get("steps"), converged=r.get("converged"),
                   weights_path=r.get("weights_path"))
        table.append(row)
        log.info("sae %s [%s]: explained variance %.3f, l0 %.1f, dead %.3f", layer, s.label,
                 r["explained_variance"], r["l0"], r["dead_fraction"])
    return {"sweep": {"params": p.sweep, "settings": [s.label for s in sweep]},
            "results": {s.label: r for s, r in zip(sweep, results)}, "comparison": table,
            "converged": all(r.get("converged") for r in results),
            "warnings": [f"{s.label}: {w}" for s, r in zip(sweep, results)
                         for w in r.get("warnings") or []]}


def report_sweeps(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown: the comparison table of each layer that ran a sweep."""
    out: list[str] = []
    for layer, r in rows:
        table = r.get("comparison")
        if not isinstance(table, list) or not table:
            continue
        out += ["", f"Sweep on `{layer}` ({len(table)} SAEs on one read of the rows):", "",
                "| setting | explained variance | L0 | dead fraction | latents | steps | "
                "converged | weights |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in table:
            cells = [row.get("setting"), _num(row.get("explained_variance")),
                     _num(row.get("l0")), _num(row.get("dead_fraction")), row.get("n_latents"),
                     row.get("steps"), row.get("converged"),
                     f"`{row['weights_path']}`" if row.get("weights_path") else "—"]
            out.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return out


def _num(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value
