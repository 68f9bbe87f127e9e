"""One training step of a :class:`~mechray.analysis.sae.model.SparseAutoencoder`, and its state.

Usage::

    from mechray.analysis.sae.train import SAETrainer

    trainer = SAETrainer(sae, lr=2e-3, aux_k=d // 2, total_steps=1000, warmup_steps=50)
    for batch in batches:
        loss = trainer.step(batch)               # a 0-d tensor
    trainer.dead_mask                            # latents silent for dead_steps_threshold steps
    trainer.saelens_dead_count()                 # SAELens' count (silent > 1,000 steps)
    tensors, state = trainer.state()             # for a checkpoint (safetensors + JSON)
    trainer.load_state(tensors, state)

**Sparse step (TopK, BatchTopK).**  The pre-activations of the whole batch are computed once
without autograd, only to choose the active latents; everything after that is restricted to
them as a CSR matrix: their pre-activations by a sampled matmul (``torch.sparse.sampled_addmm``),
the reconstruction and all gradients by sparse x dense products, so a step costs one dense
``batch x d x n_latents`` product instead of about five (AuxK the same with its ``aux_k``
latents).  The gradients are the dense formulation's exactly (top-k passes gradient only to the
chosen entries): the same SAE up to float rounding, 1.5-3x faster on CPU at d 64-512
(``benchmarks/sae_vs_saelens.py``).  ReLU and JumpReLU train densely.

**JumpReLU** (Rajamanoharan et al. 2024, as SAELens 6.54's ``JumpReLUTrainingSAE``):
``z = pre * H(pre - theta)``, the threshold ``theta`` a trained parameter (clamped >= 0) whose
gradient comes from the straight-through estimator with a rectangle kernel of width
``bandwidth``; the sparsity penalty is SAELens' ``"quadratic"`` mode around ``target_l0 = k``,
``l0_coefficient * 2 / k * (L0 - k)^2`` with the step function's L0 (same estimator).  The
threshold starts at the first batch's batch-top-k cut-off (L0 = k there) rather than SAELens'
fixed 0.01: Adam moves it by about ``lr`` a step, too slowly for a budget of ~1,000 steps.

Loss, AuxK and the unit-norm decoder: see :mod:`mechray.analysis.sae.model`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from mechray.analysis.sae.model import SparseAutoencoder

SAELENS_DEAD_FEATURE_WINDOW = 1000     # sae_lens LanguageModelSAERunnerConfig default


def dead_saelens(trainer: "SAETrainer", window: int = SAELENS_DEAD_FEATURE_WINDOW
                 ) -> dict[str, Any]:
    """Dead latents counted as SAELens 6.54 counts them (``SAETrainer.dead_neurons``, saved as
    ``num_dead_features`` in its cfg metadata): latents that have not fired in more than
    ``dead_feature_window`` (1,000) training steps.  A fit shorter than the window has none."""
    count = trainer.saelens_dead_count(window)
    return {"count": count, "fraction": count / trainer.sae.n_latents, "window_steps": window,
            "definition": f"did not fire for more than {window} training steps (SAELens "
                          f"dead_feature_window); mechray's dead_fraction: never active on the "
                          f"held-out rows nor in the last dead_steps_threshold steps"}


class _Rect(torch.autograd.Function):
    """``H(pre - theta)`` (``jump=False``) or ``pre * H(pre - theta)`` (``jump=True``) with
    SAELens' straight-through gradient for ``theta`` (and ``H``'s true gradient for ``pre``)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float,
                jump: bool) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.jump = bandwidth, jump
        gate = (pre > theta).to(pre)
        return pre * gate if jump else gate

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        window = (((pre - theta) / bw).abs() < 0.5).to(pre) / bw
        ste = (theta if ctx.jump else 1.0) * window * grad
        grad_pre = (pre > theta).to(pre) * grad if ctx.jump else None
        return grad_pre, -ste.sum(0), None, None


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():     # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, (len(crow) - 1, n))


def _rows_of(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(crow, col)`` of ``k`` latents per row, ``idx`` [rows, k] sorted per row."""
    rows, k = idx.shape
    return torch.arange(0, rows * k + 1, k, device=idx.device), idx.reshape(-1)


class _SparseCode(torch.autograd.Function):
    """``relu(pre)`` at the chosen latents (CSR ``crow``/``col``, columns sorted per row) and
    their reconstruction ``z @ W_dec``, every product restricted to those latents (sampled and
    sparse matmuls): ``(recon [rows, d], acts [nnz])`` from centred rows ``xc``."""

    @staticmethod
    def forward(ctx: Any, xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                W_dec: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> Any:
        n = W_enc.shape[1]
        pattern = _csr(crow, col, torch.zeros(len(col), dtype=xc.dtype, device=xc.device), n)
        pre = torch.sparse.sampled_addmm(pattern, xc, W_enc, beta=0.0).values()
        acts = torch.relu(pre + b_enc[col])
        ctx.save_for_backward(xc, W_enc, W_dec, crow, col, acts)
        ctx.mark_non_differentiable(acts)
        return _csr(crow, col, acts, n) @ W_dec, acts

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> Any:
        xc, W_enc, W_dec, crow, col, acts = ctx.saved_tensors
        n = W_enc.shape[1]
        pattern = _csr(crow, col, torch.zeros_like(acts), n)
        g_pre = torch.sparse.sampled_addmm(pattern, grad, W_dec.t(), beta=0.0).values() * \
            (acts > 0)
        g_code = _csr(crow, col, g_pre, n)
        g_W_dec = _csr(crow, col, acts, n).t() @ grad
        g_W_enc = (g_code.t() @ xc).t()
        g_b_enc = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, col, g_pre)
        return g_code @ W_enc.t(), g_W_enc, g_b_enc, g_W_dec, None, None


class SAETrainer:
    """Adam on one :class:`SparseAutoencoder`, with AuxK, unit-norm decoder rows and dead counts."""

    def __init__(self, sae: SparseAutoencoder, lr: float, l1_coefficient: float = 0.0,
                 aux_k: int = 0, aux_coefficient: float = 1 / 32, dead_steps_threshold: int = 256,
                 total_steps: Optional[int] = None, decay_fraction: float = 0.2,
                 warmup_steps: int = 0, l0_coefficient: float = 1.0, bandwidth: float = 0.05,
                 init_threshold: float = 0.1):
        self.sae, self.lr, self.l1 = sae, lr, l1_coefficient
        self.warmup_steps = warmup_steps
        self.aux_k, self.aux_coefficient = aux_k, aux_coefficient
        self.dead_steps_threshold = dead_steps_threshold
        self.total_steps, self.decay_fraction = total_steps, decay_fraction
        self.l0_coefficient, self.bandwidth = l0_coefficient, bandwidth
        params = list(sae.parameters())
        self.theta: Optional[nn.Parameter] = None
        if sae.architecture == "jumprelu":
            self.theta = nn.Parameter(torch.full_like(sae.threshold, init_threshold))
            params.append(self.theta)
        self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
        self.steps_since_fired = torch.zeros(sae.n_latents, dtype=torch.long,
                                             device=sae.W_dec.device)
        self.n_steps = 0

    def _lr(self) -> float:
        """Linear warmup over ``warmup_steps``, constant, then linear decay to 0 over the last
        ``decay_fraction`` of ``total_steps`` (when known)."""
        if self.n_steps < self.warmup_steps:
            return self.lr * (self.n_steps + 1) / self.warmup_steps
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

    def saelens_dead_count(self, window: int = SAELENS_DEAD_FEATURE_WINDOW) -> int:
        """SAELens' ``num_dead_features``: latents that did not fire for more than ``window``
        training steps (``n_forward_passes_since_fired > dead_feature_window``)."""
        return int((self.steps_since_fired > window).sum())

    # --- the step ------------------------------------------------------------------------------
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimisation step on raw rows ``x`` [batch, d_in]; returns the loss (0-d tensor)."""
        sae = self.sae
        sae.train()
        x = x.to(sae.W_dec.device, torch.float32) * sae.input_scale
        variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        if sae.architecture in ("topk", "batchtopk"):
            loss, e, fired, pre = self._sparse_loss(x)
        else:
            loss, e, fired, pre = self._dense_loss(x)
        loss = loss / variance
        dead = self.dead_mask
        n_dead = int(dead.sum()) if self.aux_k else 0
        if n_dead:
            k_aux = min(self.aux_k, n_dead)
            idx = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1, sorted=False).indices
            idx = idx.sort(1).values
            e_aux, _ = _SparseCode.apply(x - sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec,
                                         *_rows_of(idx))
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
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.theta is not None:
                self.theta.clamp_(min=0.0)
                sae.threshold.copy_(self.theta)
            self.steps_since_fired += 1
            self.steps_since_fired[fired] = 0
        self.n_steps += 1
        return loss.detach()

    def _sparse_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sae = self.sae
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            if sae.architecture == "topk":
                crow, col = _rows_of(pre.topk(sae.k, dim=-1, sorted=False).indices.sort(1).values)
            else:                   # batch top-k: the k * rows largest of the whole batch
                top = torch.relu(pre).reshape(-1).topk(min(sae.k * len(x), pre.numel()),
                                                       sorted=False)
                pos = top.indices[top.values > 0].sort().values
                counts = torch.bincount(pos // sae.n_latents, minlength=len(x))
                crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
                col = pos % sae.n_latents
        recon, acts = _SparseCode.apply(x - sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, crow, col)
        e = x - recon - sae.b_dec
        loss = e.pow(2).sum(-1).mean()
        with torch.no_grad():
            live = acts > 0
            fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=x.device)
            fired[col[live]] = True
            if sae.architecture == "batchtopk" and live.any():
                # running mean of the smallest kept activation (a stand-in while training;
                # calibrate_threshold sets the final value)
                low = acts[live].min()
                sae.threshold.copy_(low if self.n_steps == 0 else
                                    0.99 * sae.threshold + 0.01 * low)
        return loss, e, fired, pre

    def _dense_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sae = self.sae
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        if self.theta is not None and self.n_steps == 0:
            with torch.no_grad():   # start where L0 = k on the first batch (the batch top-k
                flat = pre.reshape(-1)  # cut-off): Adam moves theta by ~lr a step, too slowly
                cut = flat.topk(min(sae.k * len(x) + 1, flat.numel())).values[-1]
                self.theta.fill_(max(float(cut), 0.0))  # from a fixed small start
        if self.theta is not None:
            z = _Rect.apply(pre, self.theta, self.bandwidth, True)
        else:
            z = sae.activate(pre)
        e = x - (z @ sae.W_dec + sae.b_dec)
        loss = e.pow(2).sum(-1).mean()
        if sae.architecture == "relu" and self.l1:
            loss = loss + self.l1 * z.abs().sum(-1).mean()
        if self.theta is not None and self.l0_coefficient:
            l0 = _Rect.apply(pre, self.theta, self.bandwidth, False).sum(-1)
            # FVU-scaled like the reconstruction term (divided by the variance in step())
            scale = (x - x.mean(0)).pow(2).sum(-1).mean().detach()
            loss = loss + scale * self.l0_coefficient * (2 / sae.k * (l0 - sae.k) ** 2).mean()
        return loss, e, (z > 0).any(0), pre.detach()

    # --- checkpoint state ----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json_state)``: everything needed to continue training exactly."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in self.sae.state_dict().items()}
        tensors["steps_since_fired"] = self.steps_since_fired.cpu()
        if self.theta is not None:
            tensors["theta"] = self.theta.detach().cpu()
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for name, v in st.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().reshape(
                    v.shape if torch.is_tensor(v) else ())
        return tensors, {"n_steps": self.n_steps, "opt_params": len(opt["param_groups"][0][
            "params"]), "opt_keys": {str(i): sorted(st) for i, st in opt["state"].items()}}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        dev = self.sae.W_dec.device
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.steps_since_fired = tensors["steps_since_fired"].to(dev)
        if self.theta is not None:
            with torch.no_grad():
                self.theta.copy_(tensors["theta"])
        opt = self.opt.state_dict()
        opt["state"] = {int(i): {name: tensors[f"opt.{i}.{name}"].clone() for name in keys}
                        for i, keys in state["opt_keys"].items()}
        self.opt.load_state_dict(opt)
        self.n_steps = int(state["n_steps"])
