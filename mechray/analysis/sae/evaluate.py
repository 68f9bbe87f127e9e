"""How good a trained sparse autoencoder is: reconstruction on held-out rows, and the model's
output with the SAE spliced in at its layer.

Usage::

    from mechray.analysis.sae.evaluate import evaluate, splice_metrics

    metrics = evaluate(sae, held_out_rows, dead_in_training)   # mse, explained variance, l0, ...
    spliced = splice_metrics(sae, model, "popt", ...)   # the output metric with the SAE in
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mechray.analysis.inputs import as_inputs
from mechray.analysis.intervene import (
    Metric,
    edit_output,
    eval_mode,
    forward,
    model_device,
    position_mask,
)
from mechray.analysis.sae.model import SparseAutoencoder


# --- metrics ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: torch.Tensor, dead_in_training: torch.Tensor,
             batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on rows ``x`` (see the module docstring)."""
    dev = sae.W_dec.device
    x = x.to(dev, torch.float32)
    sq_err = dot = l0 = ratio = 0.0
    counts = torch.zeros(sae.n_latents, device=dev)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        z = sae.encode(xb)
        xh = sae.decode(z)
        sq_err += (xb - xh).pow(2).sum().item()
        active = z > 0
        counts += active.sum(0)
        l0 += active.sum().item()
        xn, hn = xb.norm(dim=1), xh.norm(dim=1)
        dot += ((xb * xh).sum(1) / (xn * hn).clamp_min(1e-12)).sum().item()
        ratio += (hn / xn.clamp_min(1e-12)).sum().item()
    n = len(x)
    total_var = (x - x.mean(0)).pow(2).sum().item()
    freq = counts / n
    ever = counts > 0
    log_freq = [None if f == 0 else round(math.log10(f), 4) for f in freq.tolist()]
    finite = torch.log10(freq[ever]).cpu() if ever.any() else torch.empty(0)
    lo = min(-math.log10(max(n, 1)), float(finite.min()) if len(finite) else 0.0)
    hist, edges = torch.histogram(finite.double(), bins=30, range=(math.floor(lo), 0.0))
    dead = (~ever & dead_in_training.to(dev)).float().mean().item()
    return {"mse": sq_err / (n * x.shape[1]), "mse_mean_baseline": total_var / (n * x.shape[1]),
            "explained_variance": 1.0 - sq_err / max(total_var, 1e-30), "l0": l0 / n,
            "dead_fraction": dead, "cosine_similarity": dot / n, "l2_ratio": ratio / n,
            "eval_rows": n, "latent_log10_frequency": log_freq,
            "latent_density_histogram": {"bin_edges": [round(e, 4) for e in edges.tolist()],
                                         "counts": [int(c) for c in hist.tolist()],
                                         "never_active": int((~ever).sum())}}


# --- splicing into the model ------------------------------------------------------------------
@torch.no_grad()
def splice_metrics(sae: SparseAutoencoder, model: torch.nn.Module, layer: str,
                   inputs: Any, batch_size: int = 64) -> dict[str, Any]:
    """Output degradation when ``layer``'s output is replaced by the SAE's reconstruction.

    ``splice_metrics(sae, model, "popt", x)``: the layer's output (any shape ``[..., d]``) is
    flattened to rows, reconstructed and reshaped back inside a hook that always comes off; the
    model runs in eval mode (its training flags are restored).  ``inputs`` is anything
    :func:`~mechray.analysis.inputs.as_inputs` takes; with an ``attention_mask`` only real
    positions are spliced and compared.  Metric: MSE of the model's output (its first tensor)
    against the clean output on ``inputs``, so ``clean`` is 0; ``zero_ablated`` replaces the
    layer's output with zeros; ``fraction_recovered = (zero_ablated - spliced) / (zero_ablated -
    clean)`` (1: the SAE loses nothing, 0: as bad as deleting the layer; ``None`` when zeroing
    the layer does not change the output).
    """
    sae = sae.to(model_device(model)).eval()
    x = as_inputs(inputs, 1 << 62)
    metric = Metric("mse")

    def run(batch, edit) -> torch.Tensor:
        mask = batch.mask

        def fn(out: torch.Tensor, call: int) -> torch.Tensor:
            if out.shape[-1] != sae.d_in:
                raise ValueError(f"layer {layer!r} outputs feature size {out.shape[-1]} but the "
                                 f"SAE was trained on {sae.d_in}; splice into the layer the "
                                 "shards hold")
            new = edit(out)
            m = position_mask(out, mask)
            return new if m is None else torch.where(m[..., None], new, out)
        with edit_output(model, layer, fn):
            return forward(model, batch)

    sums = torch.zeros(3, dtype=torch.float64)
    count, power = 0, 0.0
    with eval_mode(model):
        for batch in x.batches(batch_size):
            clean = forward(model, batch)
            mask = batch.mask
            rec = run(batch, lambda o: sae(o.reshape(-1, sae.d_in).float()).reshape(o.shape)
                      .to(o.dtype))
            zero = run(batch, torch.zeros_like)
            sums += torch.stack([metric.sums(clean[None], clean, mask)[0],
                                 metric.sums(rec[None], clean, mask)[0],
                                 metric.sums(zero[None], clean, mask)[0]]).double()
            count += metric.count(clean, mask)
            power += float(metric.sums(torch.zeros_like(clean)[None], clean, mask)[0])
    _, spliced, zero_m = (sums / max(count, 1)).tolist()
    recovered = (zero_m - spliced) / zero_m if zero_m > 1e-12 * max(power / max(count, 1), 1e-6) \
        else None
    return {"metric": "mse_vs_clean_output", "clean": 0.0, "spliced": spliced,
            "zero_ablated": zero_m, "fraction_recovered": recovered, "inputs": len(x),
            "masked": x.mask is not None, "skipped": False}
