"""The analysis interface: mergeable statistics, streaming fits, and model interventions.

Usage::

    from mechray.analysis.base import get_analysis, Context

    analysis = get_analysis("neuron", {"eps": 1e-6})      # params validated, unknown name listed
    # kind == "stat":  partial = analysis.map(rows, entry, layer); analysis.merge(p, q);
    #                  analysis.finalize(partial, ctx, layer) -> JSON-safe dict
    # kind == "fit":   analysis.fit(ctx, layer) -> dict  (walks ctx.store.iter_layer(layer))
    # kind == "model": analysis.run(ctx, layer) -> dict  (needs ctx.model and eval inputs)

Every analysis declares ``Params``, a pydantic model with bounds (``extra='forbid'``), so a bad
parameter fails with the field, the value and the allowed range.  Results are JSON-safe dicts;
big arrays go to files under ``ctx.out_dir`` and the result holds their relative path.  An
analysis that cannot run raises :class:`Skip` with the reason; the engine records it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mechray.errors import AnalysisParamsError


class Skip(Exception):
    """Raised by an analysis that cannot run here; the message is recorded as the reason."""



class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Context:
    """What an analysis may use besides shard rows."""

    store: Any                                   # mechray.storage.reader.ShardStore (or None for uploads)
    model: Optional[torch.nn.Module] = None
    eval_data: Optional[torch.Tensor] = None     # model inputs for causal / circuit
    out_dir: Optional[Path] = None               # where weights / components files go
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier analyses' results
    device: str = "cpu"
    seed: int = 0


class Analysis:
    """Base class; subclasses set ``name``, ``kind`` and ``Params`` and implement their methods."""

    name: ClassVar[str]
    kind: ClassVar[str]                          # "stat" | "fit" | "model"
    Params: ClassVar[type[BaseModel]] = Params

    def __init__(self, params: Optional[dict[str, Any]] = None):
        try:
            self.params = self.Params(**(params or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'params'}={e.get('input')!r}: "
                f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            fields = list(self.Params.model_fields)
            raise AnalysisParamsError(f"bad parameters for analysis {self.name!r}: {problems}. "
                                      f"Valid parameters: {fields}") from None

    # kind == "stat"
    def map(self, rows: torch.Tensor, entry: dict[str, Any], layer: str) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finalize(self, partial: Any, ctx: Context, layer: str) -> dict[str, Any]:
        raise NotImplementedError

    # kind == "fit"
    def fit(self, ctx: Context, layer: str) -> dict[str, Any]:
        raise NotImplementedError

    # kind == "model"
    def run(self, ctx: Context, layer: str) -> dict[str, Any]:
        raise NotImplementedError


REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator adding an analysis to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def get_analysis(name: str, params: Optional[dict[str, Any]] = None) -> Analysis:
    """Instantiate a registered analysis; an unknown name lists the valid ones."""
    from mechray import analysis as _  # noqa: F401  (imports every analysis module)

    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        raise KeyError(f"unknown analysis {name!r}"
                       f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                       f"valid analyses: {sorted(REGISTRY)}")
    return REGISTRY[name](params)
