"""A small NeuroFMX-like model whose module names follow the seed, on synthetic spike data.

Usage::

    from mechray.demo.model import NeuroFMX, spike_dataset

    model = NeuroFMX()                       # a LightningModule; also a plain nn.Module
    data = spike_dataset(n_trials=512)       # TensorDataset of (spikes [T, N], behaviour [T, 2])
    [n for n, _ in model.named_modules()]    # 'mamba_backbone.blocks.3', 'perceiver', 'popt', ...

Layers: ``mamba_backbone.blocks.N`` (gated causal-convolution state-space blocks),
``perceiver`` (latents cross-attending to the sequence), ``popt`` (attention pooling over the
latents), ``heads.decoder`` (spike rates, Poisson loss) and ``heads.encoder`` (behaviour, MSE).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class MambaBlock(nn.Module):
    """A Mamba-style block: input projection, causal depthwise conv, gated SiLU, residual."""

    def __init__(self, d: int, kernel: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * d)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        h = self.conv(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return x + self.out_proj(F.silu(h) * torch.sigmoid(gate))


class MambaBackbone(nn.Module):
    def __init__(self, d: int, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(MambaBlock(d) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Perceiver(nn.Module):
    """Learned latents cross-attend to the sequence: [B, T, d] -> [B, L, d]."""

    def __init__(self, d: int, n_latents: int = 8, heads: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d) / math.sqrt(d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.latents.expand(x.shape[0], -1, -1)
        z, _ = self.attn(q, x, x, need_weights=False)
        return z + self.ff(z)


class PopT(nn.Module):
    """Population-transformer style aggregator: attention pooling of latents to one vector."""

    def __init__(self, d: int):
        super().__init__()
        self.score = nn.Linear(d, 1)
        self.proj = nn.Linear(d, d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.score(z), dim=1)
        return torch.tanh(self.proj((w * z).sum(dim=1)))


class NeuroFMX(pl.LightningModule):
    """Spikes [B, T, N] -> (rates [B, T, N], behaviour [B, T, 2])."""

    def __init__(self, n_neurons: int = 32, d_model: int = 64, n_blocks: int = 8,
                 n_behaviour: int = 2, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(n_neurons, d_model)
        self.mamba_backbone = MambaBackbone(d_model, n_blocks)
        self.perceiver = Perceiver(d_model)
        self.popt = PopT(d_model)
        self.heads = nn.ModuleDict({"decoder": nn.Linear(2 * d_model, n_neurons),
                                    "encoder": nn.Linear(2 * d_model, n_behaviour)})

    def forward(self, spikes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mamba_backbone(self.embed(torch.log1p(spikes)))
        g = self.popt(self.perceiver(h))
        hg = torch.cat([h, g[:, None].expand_as(h)], dim=-1)
        return self.heads["decoder"](hg), self.heads["encoder"](hg)

    def loss(self, batch) -> torch.Tensor:
        spikes, behaviour = batch
        log_rates, pred = self(spikes)
        return F.poisson_nll_loss(log_rates, spikes, log_input=True) + F.mse_loss(pred, behaviour)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def spike_dataset(n_trials: int = 512, n_neurons: int = 32, seq_len: int = 32,
                  seed: int = 0) -> TensorDataset:
    """Poisson spikes driven by 2-D rotating latent dynamics; behaviour is the latent."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(n_trials, 1, generator=g) * 2 * math.pi
    speed = 0.2 + 0.3 * torch.rand(n_trials, 1, generator=g)
    t = torch.arange(seq_len, dtype=torch.float32)[None]
    latent = torch.stack([torch.cos(phase + speed * t), torch.sin(phase + speed * t)], dim=-1)
    readout = torch.randn(2, n_neurons, generator=g)
    rates = torch.exp(0.5 + latent @ readout * 0.8)
    spikes = torch.poisson(rates, generator=g)
    return TensorDataset(spikes, latent)
