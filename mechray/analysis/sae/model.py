"""The sparse autoencoder: module, one training step, and safetensors save/load.

Usage::

    from mechray.analysis.sae.model import SparseAutoencoder, save_sae, load_sae
    from mechray.analysis.sae.train import SAETrainer

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
ARCHITECTURES = ("topk", "batchtopk", "relu")          # trainable
INFERENCE_ARCHITECTURES = ARCHITECTURES + ("jumprelu",)   # also loadable (SAELens JumpReLU)
FORMAT = "mechray-sae/1"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class SparseAutoencoder(nn.Module):
    """A TopK / BatchTopK / ReLU sparse autoencoder over ``d_in``-dimensional rows."""

    threshold: torch.Tensor       # buffers, declared for type checkers
    input_scale: torch.Tensor

    def __init__(self, d_in: int, n_latents: int, architecture: str = "topk", k: int = 32,
                 input_scale: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if architecture not in INFERENCE_ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} is not one of "
                             f"{INFERENCE_ARCHITECTURES}")
        if architecture in ("topk", "batchtopk") and not 1 <= k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and n_latents={n_latents}; lower k or "
                             f"raise n_latents / expansion_factor")
        self.d_in, self.n_latents, self.architecture, self.k = d_in, n_latents, architecture, k
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # inference threshold per latent: batchtopk (one calibrated value) and jumprelu
        self.register_buffer("threshold", torch.zeros(n_latents))
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
        if self.architecture == "jumprelu":
            return acts * (pre > self.threshold)
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
        self.scale_encoder(x[:8192] - self.b_dec)

    @torch.no_grad()
    def scale_encoder(self, centred: torch.Tensor) -> None:
        """Scale ``W_enc`` so the first reconstruction is the least-squares best, not an overshoot.

        With ``b_enc = 0`` every architecture is positively homogeneous in ``W_enc`` (scaling it by
        ``a > 0`` scales the codes by ``a``, the chosen latents do not change), so the scale
        ``a = <c, r> / <r, r>`` for centred rows ``c`` and their reconstruction ``r`` makes the
        untrained SAE's error ``||c - a r||`` the smallest it can be.  With ``W_enc = W_dec^T``
        and unit decoder rows, ``r`` sums ``k`` overlapping unit directions and is several times
        too long (the "overshoot" of a unit-norm start); ``a`` is typically 0.1-0.5.
        """
        if self.architecture == "batchtopk":     # the training path (batch top-k)
            was = self.training
            self.train()
        r = self.activate(centred @ self.W_enc + self.b_enc) @ self.W_dec
        if self.architecture == "batchtopk" and not was:
            self.eval()
        den = r.pow(2).sum().item()
        if den > 0:
            a = (centred * r).sum().item() / den
            if a > 0:
                self.W_enc.mul_(a)

    # --- export --------------------------------------------------------------------------------
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights with ``input_scale`` folded in: they act on raw activations with ``s = 1``."""
        s = self.input_scale.item()
        return {"W_enc": self.W_enc.detach() * s, "b_enc": self.b_enc.detach().clone(),
                "W_dec": self.W_dec.detach() / s, "b_dec": self.b_dec.detach() / s,
                "threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def calibrate_threshold(self, rows: torch.Tensor, chunk: int = 4096) -> float:
        """Set the batchtopk inference threshold so ``rows`` (raw) get exactly ``k`` latents/row.

        Batch top-k keeps the ``k * n`` largest activations of a batch of ``n`` rows; run over
        all of ``rows`` at once that is one cut-off value, and the threshold is set halfway
        between the ``k*n``-th and the next largest activation, so ``encode`` in eval mode gives
        an L0 of exactly ``k`` on these rows (and about ``k`` on rows from the same
        distribution).  Candidates are gathered chunk by chunk (the global top ``k*n`` lies
        within each chunk's own top ``k*n``), so memory stays at ``chunk x n_latents``.
        """
        if self.architecture != "batchtopk":
            raise ValueError(f"calibrate_threshold is for batchtopk, not {self.architecture!r}")
        x = rows.to(self.W_dec.device, torch.float32)
        want = self.k * len(x)
        cand = []
        for i in range(0, len(x), chunk):
            acts = torch.relu(self.pre_acts(x[i:i + chunk])).reshape(-1)
            cand.append(acts.topk(min(want + 1, acts.numel()), sorted=False).values)
        top = torch.cat(cand).topk(min(want + 1, sum(len(c) for c in cand))).values
        if len(top) <= want:
            value = 0.0
        else:
            value = 0.5 * (top[want - 1] + top[want]).item()
        self.threshold.fill_(value)
        return value

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "d_in": self.d_in, "n_latents": self.n_latents,
                "architecture": self.architecture,
                "k": None if self.architecture == "relu" else self.k,
                "threshold": float(self.threshold.max()) if self.architecture == "batchtopk"
                else None, "input_scale_folded": float(self.input_scale),
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
    tensors["threshold"] = tensors["threshold"].expand(n).clone()   # older files: one scalar
    sae.load_state_dict({**tensors, "input_scale": torch.tensor(1.0)})
    return sae.to(device).eval()


# --- SAELens layout ---------------------------------------------------------------------------
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
# the SAELens release whose disk layout save_saelens writes (and is tested against): SAELens 6
# reads a cfg.json without metadata.sae_lens_version as a pre-6.0 one and drops its metadata
SAELENS_FORMAT_VERSION = "6.54.12"
_TO_SAELENS = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def save_saelens(sae: SparseAutoencoder, directory: Union[str, os.PathLike], hook_name: str,
                 metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``directory/cfg.json`` + ``sae_weights.safetensors`` as ``sae_lens`` saves an SAE.

    ``sae_lens.SAE.load_from_disk(directory)`` then encodes and decodes raw activations exactly
    as ``sae`` does.  Mapping: topk -> ``"topk"`` (``k``), relu -> ``"standard"``, batchtopk ->
    ``"jumprelu"`` with every latent's threshold set to the calibrated batch threshold (what
    SAELens itself saves a BatchTopK SAE as), jumprelu -> ``"jumprelu"``.  ``input_scale`` is
    folded into the weights (``normalize_activations: "none"``); ``hook_name`` goes into
    ``metadata`` as SAELens records it, with ``sae_lens_version`` /
    ``sae_lens_training_version`` (:data:`SAELENS_FORMAT_VERSION`, the layout written) so that
    SAELens 6 reads it as a 6.x config and ``SAE.load_from_disk(d).cfg.metadata.hook_name`` is
    the layer (without them it is ``None``).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu", torch.float32).contiguous() for k, v in sae.folded_state().items()}
    arch = _TO_SAELENS[sae.architecture]
    if arch != "jumprelu":
        state.pop("threshold")
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION,
                     "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                     "hook_name": hook_name, "trained_with": "mechray",
                     "mechray_architecture": sae.architecture, **(metadata or {})}}
    if arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    if sae.architecture == "batchtopk":
        cfg["metadata"]["batchtopk_k"] = sae.k
    tmp = directory / f".{SAELENS_WEIGHTS}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / SAELENS_WEIGHTS)
    tmp = directory / f".{SAELENS_CFG}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / SAELENS_CFG)
    return directory


def load_saelens(directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
                 ) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an SAE saved in SAELens' disk layout (no ``sae_lens`` import, no pickle).

    ``sae, cfg = load_saelens("path/to/sae_dir")`` returns an eval-mode
    :class:`SparseAutoencoder` computing what ``sae_lens`` computes for the architectures
    ``standard`` (ReLU), ``topk``, ``jumprelu`` and ``batchtopk``, and the raw ``cfg.json``.
    ``apply_b_dec_to_input: false`` is folded into ``b_enc``; activation normalisation,
    ``hook_z`` reshaping and ``rescale_acts_by_decoder_norm`` are refused with the reason.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"pretrained={str(directory)!r} is not an SAELens SAE directory: "
                                f"it needs {SAELENS_CFG} and {SAELENS_WEIGHTS} (as written by "
                                f"sae_lens SAE.save_model or mechray's saelens_path)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc}); re-save the SAE") from None
    arch = cfg.get("architecture", "standard")
    kinds = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    if arch not in kinds:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported; mechray reads "
                         f"{sorted(kinds)} (gated, matryoshka and transcoders are not)")
    for key, ok in (("normalize_activations", ("none", None)), ("reshape_activations",
                    ("none", None)), ("rescale_acts_by_decoder_norm", (False, None))):
        if cfg.get(key) not in ok:
            raise ValueError(f"{cfg_path}: {key}={cfg.get(key)!r} is not supported; mechray "
                             f"evaluates SAEs that act on raw rows ({key}={ok[0]!r})")
    t = load_file(str(weights_path), device="cpu")
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    for name, shape in (("W_enc", (d, n)), ("b_enc", (n,)), ("W_dec", (n, d)), ("b_dec", (d,))):
        if name not in t or tuple(t[name].shape) != shape:
            raise ValueError(f"{weights_path}: tensor {name} is "
                             f"{tuple(t[name].shape) if name in t else 'missing'}, expected "
                             f"{shape} for d_in={d}, d_sae={n}")
    t = {k: v.float() for k, v in t.items()}
    if not cfg.get("apply_b_dec_to_input", True):   # pre = x @ W_enc + b_enc
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    threshold = torch.zeros(n)
    if kinds[arch] == "jumprelu":
        if "threshold" not in t:
            raise ValueError(f"{weights_path}: a {arch} SAE needs a 'threshold' tensor")
        threshold = t["threshold"].reshape(-1).expand(n).clone()
    k = int(cfg.get("k") or 1)
    sae = SparseAutoencoder(d, n, kinds[arch], min(max(k, 1), n))
    sae.load_state_dict({"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"],
                         "b_dec": t["b_dec"], "threshold": threshold,
                         "input_scale": torch.tensor(1.0)})
    return sae.to(device).eval(), cfg
