"""The analysis interface: mergeable statistics, streaming fits, and model interventions.

Usage::

    from mechray.analysis.base import get_analysis, Context

    analysis = get_analysis("neuron", {"eps": 1e-6})      # params validated, unknown name listed
    p = analysis_class("neuron").validate_params({"top_k": 8})   # the typed Params, once
    get_analysis("neuron", p)                              # an instance is taken as it is
    # kind == "stat":  partial = analysis.map(rows, entry, layer); analysis.merge(p, q);
    #                  analysis.finalize(partial, ctx, layer) -> JSON-safe dict
    # kind == "fit":   analysis.fit(ctx, layer) -> dict  (walks ctx.store.iter_layer(layer))
    # kind == "model": analysis.run(ctx, layer) -> dict  (needs ctx.model and eval inputs)

Every analysis declares ``Params``, a pydantic model with bounds (``extra='forbid'``), so a bad
parameter fails with the field, the value and the allowed range.  Parameters are validated once,
where they enter (the engine, the API's planner); from there the ``Params`` instance itself travels
(to ``cost``, ``answer_bytes``, ``task_cpus``, ``reads_store`` and every task), never a dict that
restates its defaults.  Results are JSON-safe dicts;
big arrays go to files under ``ctx.out_dir`` and the result holds their relative path.  An
analysis that cannot run raises :class:`Skip` with the reason; the engine records it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mechray.errors import AnalysisParamsError, MechrayError


class Skip(Exception):
    """Raised by an analysis that cannot run here; the message is recorded as the reason."""



class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Context:
    """What an analysis may use besides shard rows."""

    store: Any                                   # mechray.storage.reader.ShardStore (or None for uploads)
    model: Optional[torch.nn.Module] = None
    eval_data: Any = None                        # model inputs (see analysis.inputs.as_inputs)
    out_dir: Optional[Path] = None               # where weights / components files go
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier analyses' results
    device: str = "cpu"
    seed: int = 0
    progress: bool = False                       # bars inside long analyses (verbose runs)
    checkpoint_dir: Optional[Path | str] = None  # resumable fit state a rerun finds: a directory
    #                                              or an s3:// URI (None: sae.checkpoint_root)


@dataclass(frozen=True)
class Workload:
    """What one request would run over, for :meth:`Analysis.cost`."""

    rows: int               # stored rows of the layer (all shards)
    d: int                  # features per row
    shard_rows: int         # rows of the largest shard (what is in memory at once)
    steps: int = 1          # saved steps holding the layer
    model_params: int = 0   # parameters of the served model (0: none)
    layers: int = 1         # captured layers (circuit path patching)
    inputs: int = 256       # model inputs available at most (config.eval_max_samples)


@dataclass(frozen=True)
class Cost:
    """Orders of magnitude: multiply-adds and peak bytes."""

    ops: float
    bytes: float


#: bytes one float takes in a JSON answer, with its separator
JSON_NUMBER = 22.0

#: one column of the report's table: (title, function of one layer's result -> cell value)
Column = tuple[str, Callable[[dict[str, Any]], Any]]


class Analysis:
    """Base class; subclasses set ``name``, ``kind`` and ``Params`` and implement their methods.

    What the rest of mechray derives from the class: ``summary`` (CLI help and API docs; default
    the docstring's first line), ``columns`` and ``plot``/``plot_file`` (the Markdown report) and
    ``cost`` (the API's limits and job routing).
    """

    name: ClassVar[str]
    kind: ClassVar[str]                          # "stat" | "fit" | "model"
    Params: ClassVar[type[BaseModel]] = Params
    summary: ClassVar[str] = ""
    columns: ClassVar[tuple[Column, ...]] = ()   # () : the result's first scalar keys
    plot_file: ClassVar[Optional[str]] = None    # PNG written beside the report by ``plot``

    @staticmethod
    def plot(per_layer: dict[str, dict[str, Any]], plt: Any) -> Any:
        """A matplotlib figure of ``{layer: result}`` for the report, or ``None``."""
        return None

    @classmethod
    def validate_params(cls, params: "Optional[dict[str, Any] | BaseModel]" = None) -> Any:
        """``params`` as this analysis's validated ``Params`` instance: a dict (or ``None``) is
        validated here, once; an instance of ``Params`` is already valid and returned as it is.
        A bad value raises :class:`AnalysisParamsError` naming the field, the value and the valid
        fields."""
        if isinstance(params, cls.Params):
            return params
        if isinstance(params, BaseModel):
            raise AnalysisParamsError(
                f"parameters for analysis {cls.name!r} are a {type(params).__name__}; pass a dict "
                f"or {cls.Params.__name__}(...)")
        try:
            return cls.Params(**(params or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'params'}={e.get('input')!r}: "
                f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            fields = list(cls.Params.model_fields)
            raise AnalysisParamsError(f"bad parameters for analysis {cls.name!r}: {problems}. "
                                      f"Valid parameters: {fields}") from None

    # The class methods below receive ``p``, the analysis's validated ``Params`` instance (typed
    # ``Any`` here so that each analysis annotates its own model: ``p: SAEParams``); its fields
    # hold the defaults, so read ``p.top_k``, never restate a default.
    @classmethod
    def cost(cls, p: Any, w: Workload) -> Cost:
        """Operations and peak bytes on one layer with validated params ``p`` (default: a
        full pass over the rows with one shard in memory as float64)."""
        return Cost(float(w.rows) * w.d * 10, float(w.shard_rows) * w.d * 8 * 3)

    @classmethod
    def answer_bytes(cls, p: Any, w: Workload) -> float:
        """Bytes of one layer's JSON result (the API refuses answers over its limit before
        running): default about 8 numbers per feature."""
        return JSON_NUMBER * w.d * 8 + 65536

    @classmethod
    def task_cpus(cls, p: Any, default: float) -> float:
        """CPUs this analysis' own Ray task holds (``default``: the engine's ``num_cpus``).  A fit
        that only coordinates workers of its own (Ray Train) holds none, so fits of several
        layers waiting for their workers never hold the CPUs those workers need."""
        return default

    @classmethod
    def describe(cls) -> str:
        """One line for help texts: ``summary`` or the docstring's first line."""
        return cls.summary or (cls.__doc__ or cls.name).strip().splitlines()[0].strip()

    #: the validated parameters, an instance of ``Params`` (typed ``Any`` so that each analysis
    #: reads its own fields; annotate ``p: MyParams = self.params`` for a checked view)
    params: Any

    def __init__(self, params: "Optional[dict[str, Any] | BaseModel]" = None):
        self.params = self.validate_params(params)     # an instance is kept, not re-validated

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


class AnalysisRegistryError(MechrayError, ValueError):
    """An analysis class cannot be registered (name taken, kind unknown)."""

    exit_code = 2


KINDS = ("stat", "fit", "model")


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator adding an analysis to the registry under ``cls.name``.

    A name registered by another class is an error (re-registering the same class, e.g. a module
    reloaded, replaces it)."""
    name, kind = getattr(cls, "name", None), getattr(cls, "kind", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise AnalysisRegistryError(f"{cls.__qualname__}.name={name!r} must be an identifier "
                                    "such as 'spread'")
    if kind not in KINDS:
        raise AnalysisRegistryError(f"{cls.__qualname__}.kind={kind!r}; use one of {KINDS}")
    old = REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise AnalysisRegistryError(
            f"analysis name {name!r} is taken by {old.__module__}.{old.__qualname__}; give "
            f"{cls.__module__}.{cls.__qualname__} another name")
    REGISTRY[name] = cls
    return cls


def analysis_names() -> list[str]:
    """Every registered analysis (the built-in ones are imported first), in registration order."""
    from mechray import analysis as _  # noqa: F401  (imports every built-in analysis module)

    return list(REGISTRY)


def analysis_class(name: str) -> type[Analysis]:
    """The registered class for ``name``; an unknown name lists the valid ones."""
    names = analysis_names()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, names, n=3)
        raise KeyError(f"unknown analysis {name!r}"
                       f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                       f"valid analyses: {sorted(names)}")
    return REGISTRY[name]


def get_analysis(name: str, params: "Optional[dict[str, Any] | BaseModel]" = None) -> Analysis:
    """Instantiate a registered analysis with a dict of params (validated) or its ``Params``
    instance (taken as it is); an unknown name lists the valid ones."""
    return analysis_class(name)(params)
