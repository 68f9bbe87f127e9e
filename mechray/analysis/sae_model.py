"""The sparse autoencoder: module, one training step, and safetensors save/load.

Usage::

    from mechray.analysis.sae_model import SparseAutoencoder, SAETrainer, save_sae, load_sae

    sae = SparseAutoencoder(d_in=512, n_latents=4096, architecture="topk", k=32)
    sae.init_from_data(sample_rows)                  # b_dec <- data mean, input scale
    trainer = SAETrainer(sae, lr=2e-4)
    for batch in batches:
        trainer.step(batch)                          # returns the loss (a 0-d tensor)
    z = sae.encode(x)                                # [rows, n_latents], non-negative, sparse
    x_hat = sae.decode(z)                            # [rows, d_in]
    save_sae(sae, "out/sae/layer.safetensors", {"layer": "layer"})   # + out/sae/layer.json
    same = load_sae("out/sae/layer.safetensors")     # safetensors only, no pickle

Conventions (SAELens / sparsify): ``W_enc`` [d_in, n_latents], ``b_enc`` [n_latents], ``W_dec``
[n_latents, d_in], ``b_dec`` [d_in] and, with ``s = input_scale`` (1 unless inputs are normalised)::

    pre   = (x * s - b_dec) @ W_enc + b_enc
    z     = topk(relu(pre), k)                  # "topk": k latents per row
          = relu(pre) * (relu(pre) > threshold) # "batchtopk" at inference (top k*rows of the
                                                #  whole batch while training; Bussmann et al.)
          = relu(pre)                           # "relu" (trained with an L1 penalty)
    x_hat = (z @ W_dec + b_dec) / s

Training keeps decoder rows at unit norm (gradient parallel to each row is removed, rows are
renormalised after each step).  Saved files fold ``s`` into the weights (SAELens' "fold activation
norm scaling factor"), so the four tensors act on raw activations with ``s = 1``; decoder rows
then have norm ``1 / s``, recorded as ``input_scale_folded`` in the config JSON.

Loss: ``(sum_d e^2 + l1_coefficient * sum |z|) / batch_variance`` (``e = x - x_hat`` in normalised
space, the L1 term for "relu" only; dividing by the batch's total variance makes the reconstruction
term the fraction of variance unexplained, FVU, and leaves SAELens' ``l1_coefficient`` scale
unchanged under Adam) plus AuxK (Gao et al. 2024): the ``aux_k`` largest pre-activations among
latents that did not fire for ``dead_steps_threshold`` steps reconstruct the residual ``e``;
``aux_coefficient * min(n_dead / aux_k, 1) * ||e - e_aux||^2 / ||e - mean(e)||^2``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)
ARCHITECTURES = ("topk", "batchtopk", "relu")
FORMAT = "mechray-sae/1"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class SparseAutoencoder(nn.Module):
    """A TopK / BatchTopK / ReLU sparse autoencoder over ``d_in``-dimensional rows."""

    def __init__(self, d_in: int, n_latents: int, architecture: str = "topk", k: int = 32,
                 input_scale: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} is not one of {ARCHITECTURES}")
        if architecture != "relu" and not 1 <= k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and n_latents={n_latents}; lower k or "
                             f"raise n_latents / expansion_factor")
        self.d_in, self.n_latents, self.architecture, self.k = d_in, n_latents, architecture, k
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(()))     # batchtopk inference threshold
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        with torch.no_grad():   # random unit decoder rows, encoder = decoder^T (Gao et al.)
            w = torch.randn(n_latents, d_in, generator=generator)
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, "
                f"architecture={self.architecture!r}, k={self.k}")

    # --- forward -------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Sparse codes from pre-activations (batch top-k only while ``self.training``)."""
        acts = torch.relu(pre)
        if self.architecture == "relu":
            return acts
        if self.architecture == "batchtopk":
            if not self.training:
                return acts * (acts > self.threshold)
            flat = acts.reshape(-1)
            rows = max(1, acts.numel() // self.n_latents)
            vals, idx = flat.topk(min(self.k * rows, flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)
        vals, idx = acts.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d_in] (raw activations) -> codes [..., n_latents]."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [..., n_latents] -> reconstruction [..., d_in] in raw activation units."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- init ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, rows: torch.Tensor, normalize_input: bool = True,
                       b_dec_init: str = "mean") -> None:
        """Set ``input_scale`` (E||x*s|| = sqrt(d_in)) and ``b_dec`` (mean or geometric median)."""
        x = rows.to(self.W_dec.device, torch.float32)
        norm = x.norm(dim=1).mean().item()
        scale = math.sqrt(self.d_in) / norm if normalize_input and norm > 0 else 1.0
        self.input_scale.fill_(scale)
        x = x * scale
        if b_dec_init == "mean":
            self.b_dec.copy_(x.mean(0))
        elif b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif b_dec_init == "zeros":
            self.b_dec.zero_()
        else:
            raise ValueError(f"b_dec_init={b_dec_init!r}: use 'mean', 'geometric_median' or "
                             f"'zeros'")

    # --- export --------------------------------------------------------------------------------
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights with ``input_scale`` folded in: they act on raw activations with ``s = 1``."""
        s = self.input_scale.item()
        return {"W_enc": self.W_enc.detach() * s, "b_enc": self.b_enc.detach().clone(),
                "W_dec": self.W_dec.detach() / s, "b_dec": self.b_dec.detach() / s,
                "threshold": self.threshold.detach().clone()}

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "d_in": self.d_in, "n_latents": self.n_latents,
                "architecture": self.architecture,
                "k": None if self.architecture == "relu" else self.k,
                "threshold": float(self.threshold), "input_scale_folded": float(self.input_scale),
                "encode": "z = act((x - b_dec) @ W_enc + b_enc)",
                "decode": "x_hat = z @ W_dec + b_dec"}


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on rows of ``x`` [n, d]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= tol * (y.norm() + 1e-12):
            return y_next
        y = y_next
    return y


class SAETrainer:
    """Adam on one :class:`SparseAutoencoder`, with AuxK, unit-norm decoder rows and dead counts."""

    def __init__(self, sae: SparseAutoencoder, lr: float, l1_coefficient: float = 0.0,
                 aux_k: int = 0, aux_coefficient: float = 1 / 32, dead_steps_threshold: int = 256,
                 total_steps: Optional[int] = None, decay_fraction: float = 0.2):
        self.sae, self.lr, self.l1 = sae, lr, l1_coefficient
        self.aux_k, self.aux_coefficient = aux_k, aux_coefficient
        self.dead_steps_threshold = dead_steps_threshold
        self.total_steps, self.decay_fraction = total_steps, decay_fraction
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
        self.steps_since_fired = torch.zeros(sae.n_latents, dtype=torch.long,
                                             device=sae.W_dec.device)
        self.n_steps = 0

    def _lr(self) -> float:
        """Constant, then linear decay to 0 over the last ``decay_fraction`` of known steps."""
        if not self.total_steps:
            return self.lr
        start = self.total_steps * (1 - self.decay_fraction)
        if self.n_steps < start:
            return self.lr
        left = (self.total_steps - self.n_steps) / max(1.0, self.total_steps - start)
        return self.lr * max(0.0, left)

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired >= self.dead_steps_threshold

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimisation step on raw rows ``x`` [batch, d_in]; returns the loss (0-d tensor)."""
        sae = self.sae
        sae.train()
        x = x.to(sae.W_dec.device, torch.float32) * sae.input_scale
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = sae.activate(pre)
        e = x - (z @ sae.W_dec + sae.b_dec)
        variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        loss = e.pow(2).sum(-1).mean()
        if sae.architecture == "relu" and self.l1:
            loss = loss + self.l1 * z.abs().sum(-1).mean()
        loss = loss / variance
        dead = self.dead_mask
        n_dead = int(dead.sum()) if self.aux_k else 0
        if n_dead:
            k_aux = min(self.aux_k, n_dead)
            vals, idx = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            e_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals)) @ sae.W_dec
            target = e.detach()
            aux = (target - e_aux).pow(2).sum(-1).mean() / \
                (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            loss = loss + self.aux_coefficient * min(n_dead / self.aux_k, 1.0) * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = sae.W_dec, sae.W_dec.grad
            if g is not None:   # keep only the gradient orthogonal to each unit decoder row
                g -= (g * w).sum(1, keepdim=True) * w
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = (z > 0).any(0)
            self.steps_since_fired += 1
            self.steps_since_fired[fired] = 0
            if sae.architecture == "batchtopk":   # running mean of the smallest kept activation
                kept = z[z > 0]
                if kept.numel():
                    low = kept.min()
                    sae.threshold.copy_(low if self.n_steps == 0 else
                                        0.99 * sae.threshold + 0.01 * low)
        self.n_steps += 1
        return loss.detach()


# --- files ------------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, path: Union[str, os.PathLike],
             extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``path`` (safetensors, folded weights, config in its metadata) and ``path`` .json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**sae.config(), **(extra or {})}
    text = json.dumps(config, indent=2, sort_keys=True)
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in sae.folded_state().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"mechray_sae": text})
    os.replace(tmp, path)
    tmp_json = path.with_name(f".{path.stem}.json.tmp")
    tmp_json.write_text(text)
    os.replace(tmp_json, path.with_suffix(".json"))
    return path


def load_sae(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
             ) -> SparseAutoencoder:
    """Reload a saved SAE (``.safetensors``, or its ``.json`` beside it) in eval mode.

    ``load_sae(p).encode(x)`` reproduces the codes of the trained SAE on raw activations ``x``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"no SAE weights at {path}; pass the weights_path from the sae "
                                f"result joined to the results directory")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "mechray_sae" in meta:
        config = json.loads(meta["mechray_sae"])
    elif path.with_suffix(".json").is_file():
        config = json.loads(path.with_suffix(".json").read_text())
    else:
        raise ValueError(f"{path} holds no mechray SAE config (metadata 'mechray_sae') and has no "
                         f"{path.with_suffix('.json').name} beside it; it was not written by "
                         f"save_sae")
    tensors = load_file(str(path), device=str(device))
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensors {missing}; expected {list(_TENSORS)}")
    d, n = config["d_in"], config["n_latents"]
    if tuple(tensors["W_enc"].shape) != (d, n) or tuple(tensors["W_dec"].shape) != (n, d):
        raise ValueError(f"{path}: W_enc {tuple(tensors['W_enc'].shape)} / W_dec "
                         f"{tuple(tensors['W_dec'].shape)} do not match d_in={d}, n_latents={n}")
    sae = SparseAutoencoder(d, n, config["architecture"], config.get("k") or 1)
    sae.load_state_dict({**tensors, "input_scale": torch.tensor(1.0)})
    return sae.to(device).eval()
