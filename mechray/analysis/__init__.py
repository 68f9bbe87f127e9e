"""Analysis: statistics and fits over stored shards, fanned out as Ray tasks over (layer × shard).

Importing this package registers every analysis. ``base`` (the interface and the registry),
one module per analysis, ``engine`` (map → merge → finalize, in Ray or in one process) with its ``tasks``,
``runner`` (:class:`EvalMechIntRunner`) and ``report`` (JSON, Markdown, plots).

May import: ``mechray.storage`` (reading only), ``mechray.config``, ``mechray.errors``.
Never ``capture`` or ``api``.

Usage::

    from mechray.analysis import get_analysis, REGISTRY
"""

from mechray.analysis.base import (
    REGISTRY,
    Analysis,
    Context,
    Cost,
    Skip,
    Workload,
    analysis_class,
    analysis_names,
    get_analysis,
    register,
)

__all__ = ["REGISTRY", "Analysis", "Context", "Cost", "Skip", "Workload", "analysis_class",
           "analysis_names", "get_analysis", "register"]

# Built-in analyses register themselves on import, in this order (the order help texts list).
from mechray.analysis import neuron, feature, sae, causal, circuit, dynamics  # noqa: E402,F401,I001  # isort: skip
from mechray.analysis import crosscoder, tracking  # noqa: E402,F401,I001  # isort: skip
