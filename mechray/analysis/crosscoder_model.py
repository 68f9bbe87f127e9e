"""The crosscoder over training steps: modules, training step, and safetensors files.

Usage::

    from mechray.analysis.crosscoder_model import StepCrosscoder, StepTrainer, save_crosscoder,
        load_crosscoder

    cc = StepCrosscoder(d_in=64, groups=5, n_latents=512, k=16)     # rows of each step
    trainer = StepTrainer(cc, lr=1e-3, total_steps=1000)
    trainer.step_rows(x, g)                 # x [batch, d] rows, g [batch] their step group
    z = cc.encode(x, g); x_hat = cc.decode(z, g)
    save_crosscoder(out / "crosscoder/popt.safetensors", tensors, config)
    tensors, config = load_crosscoder(out / "crosscoder/popt.safetensors")   # no pickle

Two forms, chosen by what the store holds (:mod:`mechray.analysis.step_rows`):

*paired* (the same inputs at every step group, Lindsey et al. 2024's acausal crosscoder): the
input is the concatenation ``[x^1, ..., x^G]`` of one input's activations at the ``G`` groups, and
the model is exactly a :class:`~mechray.analysis.sae.model.SparseAutoencoder` over ``G * d``
features (trained by :class:`~mechray.analysis.sae.train.SAETrainer`, sparse step and AuxK
included): ``z = topk(relu(sum_g (x^g - b^g) W_enc^g + b_enc), k)``, ``x_hat^g = z W_dec^g + b^g``.

*unpaired* (:class:`StepCrosscoder`, rows of each step, different inputs): a row ``x`` of group
``g`` is encoded by one shared encoder and decoded by its group's slice only:
``z = topk(relu((x - b^g) W_enc + b_enc), k)``, ``x_hat = z W_dec^g + b^g``; the loss is the
row's own group's error.  Decoder rows are unit-norm over the concatenation of slices in both
forms (``sum_g ||W_dec^g_i||^2 = 1``).

Files: one safetensors with ``W_enc`` [G, d, n] (paired: the encoder reads every group's block
and sums; unpaired: a row of group ``g`` uses block ``g``), ``b_enc`` [n], ``W_dec`` [n, G, d],
``b_dec`` [G, d], all acting on raw activations (the per-group input scales folded in), and the
config JSON in its metadata and beside it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from mechray.analysis.sae.train import SAETrainer

FORMAT = "mechray-crosscoder/1"


class StepCrosscoder(nn.Module):
    """Shared TopK encoder, one decoder slice per step group (the *unpaired* form)."""

    threshold: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, d_in: int, groups: int, n_latents: int, k: int,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and n_latents={n_latents}")
        self.d_in, self.groups, self.n_latents, self.k = d_in, groups, n_latents, k
        self.architecture = "topk"                 # what SAETrainer dispatches on
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, groups * d_in))
        self.b_dec = nn.Parameter(torch.zeros(groups * d_in))
        self.register_buffer("threshold", torch.zeros(n_latents))
        self.register_buffer("input_scale", torch.tensor(1.0))
        with torch.no_grad():   # the same unit direction at every step, encoder = its transpose
            w = torch.randn(n_latents, d_in, generator=generator)
            w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.copy_(w.repeat(1, groups) / math.sqrt(groups))
            self.W_enc.copy_(w.T)

    def slices(self) -> torch.Tensor:
        """``W_dec`` as [n_latents, groups, d_in]."""
        return self.W_dec.view(self.n_latents, self.groups, self.d_in)

    def bias(self) -> torch.Tensor:
        return self.b_dec.view(self.groups, self.d_in)

    def pre_acts(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (x - self.bias()[g]) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(self.pre_acts(x, g))
        vals, idx = acts.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, idx, vals)

    def decode(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Each row through its own group's slice (one product per group present)."""
        out = torch.empty(len(z), self.d_in, dtype=z.dtype, device=z.device)
        w, b = self.slices(), self.bias()
        for s in torch.unique(g).tolist():
            m = g == s
            out[m] = z[m] @ w[:, s] + b[s]
        return out

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """``b^g`` <- each group's mean; encoder scaled so the first reconstruction is the
        least-squares best (as :meth:`SparseAutoencoder.scale_encoder`)."""
        for s in range(self.groups):
            rows = x[g == s]
            if len(rows):
                self.bias()[s].copy_(rows.mean(0))
        x, g = x[:8192], g[:8192]
        c = x - self.bias()[g]
        r = self.decode(self.encode(x, g), g) - self.bias()[g]
        den = r.pow(2).sum().item()
        a = (c * r).sum().item() / den if den > 0 else 0.0
        if a > 0:
            self.W_enc.mul_(a)


class StepTrainer(SAETrainer):
    """:class:`SAETrainer` (Adam, schedule, unit-norm decoder rows, dead counts, checkpoint
    state) on a :class:`StepCrosscoder`: call :meth:`step_rows` with each row's group."""

    def __init__(self, model: StepCrosscoder, lr: float, **kw: Any):
        super().__init__(model, lr, aux_k=0, **kw)   # type: ignore[arg-type]
        self._g: Optional[torch.Tensor] = None

    def step_rows(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self._g = g.to(self.sae.W_dec.device)
        return self.step(x)

    def _sparse_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model: Any = self.sae
        g = self._g
        assert g is not None, "call step_rows(x, groups), not step(x)"
        pre = model.pre_acts(x, g)
        idx = pre.detach().topk(model.k, dim=-1, sorted=False).indices
        acts = torch.relu(pre.gather(1, idx))
        z = torch.zeros_like(pre).scatter(1, idx, acts)
        e = x - model.decode(z, g)
        loss = e.pow(2).sum(-1).mean()
        with torch.no_grad():
            fired = torch.zeros(model.n_latents, dtype=torch.bool, device=x.device)
            fired[idx[acts.detach() > 0]] = True
        return loss, e.detach(), fired, pre.detach()


# --- files ------------------------------------------------------------------------------------
def save_crosscoder(path: Union[str, os.PathLike], tensors: dict[str, torch.Tensor],
                    config: dict[str, Any]) -> Path:
    """Write ``path`` (safetensors, config JSON in its metadata) and ``path`` .json, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, **config}, indent=1, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(tmp), metadata={"mechray_crosscoder": text})
    os.replace(tmp, path)
    tmp = path.with_name(f".{path.stem}.json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path.with_suffix(".json"))
    return path


def load_crosscoder(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, Any]]:
    """``(tensors, config)`` of a saved crosscoder (safetensors only, nothing unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no crosscoder weights at {path}; pass the weights_path of the "
                                f"crosscoder result joined to the results directory")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "mechray_crosscoder" not in meta:
        raise ValueError(f"{path} holds no mechray crosscoder config (metadata "
                         f"'mechray_crosscoder'); it was not written by save_crosscoder")
    return load_file(str(path)), json.loads(meta["mechray_crosscoder"])


def encode_raw(tensors: dict[str, torch.Tensor], config: dict[str, Any], x: torch.Tensor,
               group: Optional[int] = None) -> torch.Tensor:
    """Codes from raw rows with saved tensors: paired ``x`` [rows, G, d] (every group of one
    input), unpaired ``x`` [rows, d] of step group ``group``."""
    w, b = tensors["W_enc"], tensors["b_dec"]
    if config["mode"] == "paired":
        pre = torch.einsum("rgd,gdn->rn", x - b, w) + tensors["b_enc"]
    else:
        if group is None:
            raise ValueError("an unpaired crosscoder needs the rows' step group: "
                             "encode_raw(tensors, config, x, group=g)")
        pre = (x - b[group]) @ w[group] + tensors["b_enc"]
    acts = torch.relu(pre)
    vals, idx = acts.topk(int(config["k"]), dim=-1)
    return torch.zeros_like(acts).scatter(-1, idx, vals)
