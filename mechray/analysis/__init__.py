"""Analyses over stored activations; importing this package registers every analysis.

Usage::

    from mechray.analysis import get_analysis, REGISTRY
"""

from mechray.analysis.base import REGISTRY, Analysis, Context, Skip, get_analysis, register

__all__ = ["REGISTRY", "Analysis", "Context", "Skip", "get_analysis", "register"]

# Analysis modules register themselves on import; each is added here as it lands.
from mechray.analysis import causal, circuit, dynamics, feature, neuron, sae  # noqa: E402,F401
