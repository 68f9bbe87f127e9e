"""Showing features across training: the timeline plot and the report's birth lines.

Usage::

    from mechray.analysis.timeline import birth_lines, timeline

    fig = timeline(per_layer_results, plt, "relative_strength", "crosscoder: strength / its peak")
    lines = birth_lines([(layer, result), ...])     # Markdown lines for the report

Shared by ``crosscoder`` and ``sae_tracking`` (their ``plot`` and ``report_lines``); a result
needs ``steps``, ``kind``, ``birth_step``, ``death_step``, the plotted key (latents x step
groups, values in [0, 1]) and, for the lines, ``births_per_step`` / ``deaths_per_step``,
``born_late`` and ``peak_step``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def timeline(per: dict[str, dict[str, Any]], plt: Any, key: str, title: str) -> Any:
    """Latents x step groups per layer, coloured by ``result[key]`` (live latents only, ordered
    by birth then peak)."""
    shown = {la: r for la, r in per.items() if r.get(key) and r.get("kind")}
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 5), squeeze=False)
    for ax, (layer, r) in zip(axes[0], shown.items()):
        m = np.asarray(r[key], dtype=float)
        steps = r["steps"]
        live = [i for i, k in enumerate(r["kind"]) if k != "rare"]
        first = {s: j for j, s in enumerate(steps)}
        live.sort(key=lambda i: (first.get(r["birth_step"][i], 0),
                                 first.get(r["death_step"][i], len(steps)), i))
        if not live:
            ax.set_axis_off()
            continue
        im = ax.imshow(m[live], aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0, vmax=1)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], rotation=45, fontsize=7)
        ax.set(xlabel="saved step", ylabel=f"live latents ({len(live)})", title=layer)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(title)
    return fig


def birth_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown: births and deaths per step, and the latents born late with their steps."""
    out: list[str] = []
    for layer, r in rows:
        births = {s: c for s, c in (r.get("births_per_step") or {}).items() if c}
        deaths = {s: c for s, c in (r.get("deaths_per_step") or {}).items() if c}
        out += ["", f"`{layer}`: births per step {births or 'none'}; deaths per step "
                    f"{deaths or 'none'}."]
        late = (r.get("born_late") or [])[:8]
        if late:
            out.append("Born late (latent: birth, peak, death step): " + "; ".join(
                f"{i}: {r['birth_step'][i]}, {r['peak_step'][i]}, {r['death_step'][i]}"
                for i in late))
    return out
