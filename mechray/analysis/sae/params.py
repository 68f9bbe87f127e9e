"""The ``sae`` analysis' parameters (validated once, where a request or a config enters) and
the size limits they are checked against.

Usage::

    from mechray.analysis.sae.params import SAEParams

    p = SAEParams(k=16, expansion_factor=4)     # a ValueError names any bad value
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from mechray.analysis.base import Params
from mechray.analysis.sae.budget import MAX_EPOCHS

MAX_LATENTS = 65536
MAX_PARAMETERS = 2 ** 28        # n_latents * d_in: ~4 GiB of weights + Adam state in float32
MAX_CODE_ELEMENTS = 2 ** 28     # batch_size * n_latents: ~1 GiB per activation tensor
MAX_SWEEP = 16                  # SAEs one sweep trains on one pass over the rows
#: what a sweep may vary: the SAE and its optimiser, never the rows it sees (seed, batch_size,
#: max_rows, holdout ... stay shared, so one read of each batch feeds every SAE)
SWEEPABLE = ("k", "expansion_factor", "n_latents", "l1_coefficient", "l0_coefficient",
             "architecture", "lr", "aux_k", "aux_coefficient", "jumprelu_bandwidth",
             "dead_steps_threshold", "warmup_steps", "min_steps")


class SAEParams(Params):
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    expansion_factor: int = Field(8, ge=1, le=256, description="n_latents = expansion_factor * d")
    n_latents: Optional[int] = Field(None, ge=1, le=MAX_LATENTS, description="overrides expansion")
    k: int = Field(32, ge=1, le=4096, description="active latents per row (topk, batchtopk; "
                                                   "jumprelu: the target L0)")
    l1_coefficient: float = Field(5.0, ge=0.0, le=1e4, description="L1 weight (relu only)")
    l0_coefficient: float = Field(0.05, ge=0.0, le=1e4,
                                  description="jumprelu: weight of the quadratic L0 penalty "
                                              "around k")
    jumprelu_bandwidth: float = Field(0.05, gt=0.0, le=10.0,
                                      description="jumprelu: straight-through kernel width")
    checkpoint_every: int = Field(500, ge=0, le=10_000_000,
                                  description="steps between resumable checkpoints in the "
                                              "output dir (0: none)")
    lr: Optional[float] = Field(None, gt=0.0, le=1.0,
                                description="Adam lr; None: auto_lr(n_latents, steps run)")
    min_steps: Optional[int] = Field(None, ge=1, le=10_000_000,
                                     description="budget: at least this many steps, as many "
                                                 "epochs as that takes (None: max(1000, "
                                                 "2 * n_latents); ignored when steps or epochs "
                                                 "is set)")
    max_epochs: Optional[int] = Field(MAX_EPOCHS, ge=1, le=100_000,
                                      description="budget: at most this many epochs over a "
                                                  "small store (None: no cap; ignored when "
                                                  "steps or epochs is set)")
    early_stop: Optional[bool] = Field(None, description="stop when the held-out loss stops "
                                                         "improving or rises; None: on unless "
                                                         "steps or epochs is set")
    eval_every: Optional[int] = Field(None, ge=1, le=10_000_000,
                                      description="early stop: steps between held-out "
                                                  "evaluations (None: total // 20, >= 5)")
    epochs: Optional[int] = Field(None, ge=1, le=10_000,
                                  description="overrides the budget: exactly this many epochs")
    steps: Optional[int] = Field(None, ge=1, le=10_000_000, description="overrides everything")
    warmup_steps: Optional[int] = Field(None, ge=0, le=1_000_000,
                                        description="linear lr warmup; None: 5% of steps, <= 1000")
    batch_size: int = Field(1024, ge=1, le=65536)
    seed: int = Field(0, ge=0, le=2 ** 31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    aux_k: Optional[int] = Field(None, ge=0, le=MAX_LATENTS,
                                 description="AuxK latents; None: d // 2, 0 disables")
    aux_coefficient: float = Field(1 / 32, ge=0.0, le=100.0)
    dead_steps_threshold: int = Field(256, ge=1, le=10_000_000)
    holdout_fraction: float = Field(0.05, gt=0.0, le=0.5)
    max_eval_rows: int = Field(8192, ge=16, le=1_000_000)
    max_rows: Optional[int] = Field(None, ge=1, le=10 ** 10, description="training rows read")
    buffer_mb: float = Field(512.0, ge=1.0, le=65536.0, description="shuffle-buffer budget")
    normalize_input: bool = True
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "mean"
    splice_max_inputs: int = Field(256, ge=1, le=100_000, description="eval inputs spliced")
    save_weights: bool = True
    pretrained: Optional[str] = Field(None, min_length=1, max_length=4096,
                                      description="SAELens SAE directory (or mechray "
                                                  ".safetensors) to evaluate; no training")
    top_latents: int = Field(16, ge=0, le=4096,
                             description="latents (most often active on held-out rows) whose "
                                         "top-activating rows are listed; 0: none")
    latents: Optional[list[int]] = Field(None, max_length=4096,
                                         description="list these latents instead")
    k_examples: int = Field(5, ge=1, le=1000, description="top-activating rows per latent")
    num_workers: int = Field(1, ge=1, le=1024,
                             description="Ray Train workers training one SAE data-parallel "
                                         "(1: this process; see sae_distributed)")
    gpus_per_worker: float = Field(0.0, ge=0.0, le=8.0, description="num_workers > 1: GPUs "
                                   "per worker (> 0: NCCL on CUDA, else gloo on CPU)")
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0, description="num_workers > 1")
    max_failures: int = Field(3, ge=0, le=100, description="num_workers > 1: restarts from "
                              "the last checkpoint after a lost worker")

    sweep: Optional[dict[str, list[Union[int, float, str, None]]]] = Field(
        None, description="several SAEs on one pass over the rows: {param: [values]} (the "
                          "grid of every combination, at most 16 SAEs; params: "
                          + ", ".join(SWEEPABLE) + "); see sae.sweep")

    @model_validator(mode="after")
    def _sweep_is_a_grid_of_sae_settings(self) -> "SAEParams":
        if not self.sweep:
            return self
        bad = sorted(set(self.sweep) - set(SWEEPABLE))
        if bad:
            raise ValueError(f"sweep over {bad} is not possible: a sweep shares the rows, so it "
                             f"varies only {list(SWEEPABLE)}; run separate fits for the others")
        empty = [key for key, values in self.sweep.items() if not values]
        if empty:
            raise ValueError(f"sweep[{empty[0]!r}] is empty; give at least one value")
        count = math.prod(len(v) for v in self.sweep.values())
        if count > MAX_SWEEP:
            raise ValueError(f"sweep={self.sweep} is {count} SAEs, more than {MAX_SWEEP}; "
                             f"split it into several sweeps")
        for values in itertools.product(*self.sweep.values()):   # each setting is valid
            SAEParams(**{**self.model_dump(), **dict(zip(self.sweep, values)), "sweep": None})
        return self

    @model_validator(mode="after")
    def _k_fits(self) -> "SAEParams":
        if self.n_latents is not None and self.architecture in ("topk", "batchtopk") and \
                self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be <= n_latents={self.n_latents}; lower k or "
                             f"raise n_latents")
        return self
