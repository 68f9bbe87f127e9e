"""Small helpers analyses use to declare their report columns and plots.

Usage::

    from mechray.analysis.render import grid, mean_of, span

    class Spread(Analysis):
        columns = (("mean range", mean_of("range")), ("steps", lambda r: span(r["steps"])))

        @staticmethod
        def plot(per_layer, plt):
            fig, axes = grid(plt, len(per_layer), 1)
            ...
            return fig
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

TOP_BARS = 10


def mean_of(key: str) -> Callable[[dict], Any]:
    """A column: the mean of a per-neuron list in the result."""
    return lambda r: float(np.mean(r[key]))


def top_effects(r: dict) -> str:
    """A column: the five largest ranked effects, ``neuron: effect`` (``head h: effect``)."""
    return ", ".join(f"{unit_label(e)}: {e['effect']:.3g}" for e in r.get("ranked", [])[:5])


def unit_label(entry: dict) -> str:
    """``"7"`` for a ranked neuron, ``"head 3"`` for a ranked attention head."""
    return f"head {entry['head']}" if "head" in entry else str(entry.get("neuron"))


def series(values: list) -> str:
    """A short text for a series of numbers (``None`` shown as —)."""
    known = [v for v in values if v is not None]
    if len(values) <= 6:
        return ", ".join("—" if v is None else f"{v:.3f}" for v in values)
    return f"min {min(known):.3f}, last {known[-1]:.3f}" if known else "—"


def span(steps: list) -> str:
    """A short text for a list of steps."""
    if not steps:
        return "—"
    if len(steps) > 3:
        return f"{steps[0]}…{steps[-1]} ({len(steps)})"
    return ", ".join(map(str, steps))


def grid(plt: Any, n: int, cols: int, w: float = 4.0, h: float = 2.6) -> tuple[Any, Any]:
    """``(figure, axes[n][cols])`` sized for the report."""
    fig, axes = plt.subplots(n, cols, figsize=(w * cols, h * n), squeeze=False)
    return fig, axes


def plot_ranked(per_layer: dict[str, dict[str, Any]], plt: Any) -> Any:
    """Bars of the top ranked effects per layer (causal, circuit)."""
    per = {la: r for la, r in per_layer.items() if r.get("ranked")}
    if not per:
        return None
    fig, axes = grid(plt, len(per), 1, w=6.0)
    for (layer, r), (ax,) in zip(per.items(), axes):
        top = r["ranked"][:TOP_BARS]
        ax.bar(np.arange(len(top)), [e["effect"] for e in top])
        ax.set_xticks(np.arange(len(top)), [unit_label(e) for e in top])
        ax.set(title=f"{layer} (layer effect {r.get('layer_effect', float('nan')):.3g})",
               xlabel="head" if "head" in top[0] else "neuron", ylabel="effect")
    fig.tight_layout()
    return fig
