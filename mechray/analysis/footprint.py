"""Memory footprint of an intervention sweep, estimated before it starts, and batch sizes that fit.

Usage::

    from mechray.analysis.footprint import Footprint, available_bytes

    fp = Footprint.measure(model, probe, layer_bytes=b)   # one forward of a few probe rows
    plan = fp.fit(n_inputs=128, batch_size=64, neuron_batch=16,
                  budget=available_bytes(model) // 2, what="causal 'transformer.h.1'")
    plan.batch_size, plan.neuron_batch, plan.bytes         # the largest sizes within the budget

The probe forward (a few inputs at the full padded length, so an upper bound for the trimmed
batches) records, per input, the largest single module output and the model's output (bytes).
A pass over ``k`` stacked copies of a batch of ``b`` inputs is estimated at
``k * b * (3 * largest + metric_factor * output)`` bytes (a
module's input, output and one temporary live at once under ``no_grad``; the metric keeps a few
output-sized tensors), plus what the sweep keeps for every input (clean outputs and the
recorded layer).  With gradients (``circuit``'s attribution) every module output of a batch is
kept.  When even one input and one neuron per pass exceed the budget the error says how much
is needed and what to change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mechray.errors import AnalysisParamsError

log = logging.getLogger(__name__)
GB = 1024 ** 3


def available_bytes(model: nn.Module) -> int:
    """Free memory where ``model`` runs: the CUDA device's free memory, or the host's available
    memory (``MemAvailable``, else free pages)."""
    from mechray.analysis.inputs import model_device

    device = model_device(model)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * GB


@dataclass
class Plan:
    """Batch sizes chosen to fit ``budget`` bytes, and the estimated peak ``bytes``."""

    batch_size: int
    neuron_batch: int
    bytes: int
    budget: int

    def describe(self) -> dict[str, Any]:
        return {"estimated_gb": round(self.bytes / GB, 3), "budget_gb": round(self.budget / GB, 3),
                "batch_size": self.batch_size, "neuron_batch": self.neuron_batch}


@dataclass
class Footprint:
    """Bytes per input of one forward (measured on a probe batch)."""

    largest: float        # the largest single module output
    total: float          # every module output (what a backward keeps)
    output: float         # the model's output (float32)
    layer: float          # the edited layer's output

    @classmethod
    def measure(cls, model: nn.Module, probe: Any, layer_bytes: float) -> "Footprint":
        """Run ``probe`` (:class:`~mechray.analysis.inputs.ModelInputs`) once under
        ``no_grad`` with a hook on every module; ``layer_bytes``: the layer's output on it."""
        from mechray.analysis.inputs import output_of

        sizes: list[int] = []

        def hook(m: nn.Module, args: Any, out: Any) -> None:
            sizes.append(_bytes(out))
        handles = [m.register_forward_hook(hook) for _, m in model.named_modules()]
        try:
            with torch.no_grad():
                y = output_of(probe(model))
        finally:
            for h in handles:
                h.remove()
        n = max(len(probe), 1)
        inner = sizes[:-1] or [0]           # the last hook to fire is the model itself
        return cls(largest=max(inner) / n, total=sum(inner) / n, output=y.numel() * 4 / n,
                   layer=layer_bytes / n)

    def estimate(self, n_inputs: int, batch: int, copies: int, metric_factor: float = 3.0,
                 grad: bool = False, keep_per_input: float = 2.0) -> int:
        """Peak bytes of a sweep pass plus what is kept for all ``n_inputs``."""
        passes = copies * batch * (3 * self.largest + metric_factor * self.output)
        if grad:
            passes = max(passes, batch * (self.total + metric_factor * self.output))
        kept = n_inputs * keep_per_input * (self.output + self.layer)
        return int(passes + kept)

    def fit(self, n_inputs: int, batch_size: int, neuron_batch: int, budget: int, what: str,
            metric_factor: float = 3.0, grad: bool = False, keep_per_input: float = 2.0
            ) -> Plan:
        """The largest ``(batch_size, neuron_batch)`` not above the requested ones whose estimate
        fits ``budget`` (fewer stacked neurons first, then smaller batches)."""
        b, k = max(1, min(batch_size, n_inputs)), max(1, neuron_batch)

        def est(b: int, k: int) -> int:
            return self.estimate(n_inputs, b, k, metric_factor, grad, keep_per_input)
        while est(b, k) > budget and (k > 1 or b > 1):
            if k > 1:
                k = max(1, k // 2)
            else:
                b = max(1, b // 2)
        need = est(b, k)
        if need > budget:
            raise AnalysisParamsError(
                f"{what}: needs about {need / GB:.2f} GB even with batch_size=1 and "
                f"neuron_batch=1 ({n_inputs} inputs), above the memory budget of "
                f"{budget / GB:.2f} GB; raise memory_budget_gb, give fewer inputs (n_inputs) "
                f"or shorter ones (truncate with max_length)")
        if (b, k) != (min(batch_size, n_inputs), neuron_batch):
            log.info("mechray: %s: batch_size %d -> %d, neuron_batch %d -> %d to stay within "
                     "%.2f GB (estimated %.2f GB)", what, batch_size, b, neuron_batch, k,
                     budget / GB, need / GB)
        return Plan(b, k, need, budget)


def _bytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_bytes(v) for v in out)
    if isinstance(out, dict):
        return sum(_bytes(v) for v in out.values())
    return sum(_bytes(v) for v in getattr(out, "__dict__", {}).values()
               if isinstance(v, (torch.Tensor, tuple, list)))
