"""The Markdown report and its PNG plots, written from a results document.

Usage::

    from mechray.analysis.report import write_report

    path = write_report(doc, "results")    # doc: the mechint_results.json content
    # results/mechint_report.md embeds results/explained_variance.png, neuron_activations.png,
    # sae_latent_density.png, causal_effects.png, circuit_effects.png, dynamics.png

Every plot draws only what the results hold: an analysis that is missing, skipped on some layers
or shaped differently leaves its plot out (or a layer out of it), never breaks the report.  Skipped
layers are listed with their reasons.  Matplotlib runs with the ``Agg`` backend (no display).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from mechray.analysis.base import REGISTRY, analysis_class, analysis_names
from mechray.analysis.contexts import markdown as contexts_markdown
from mechray.analysis.lens import markdown as lens_markdown
from mechray.analysis.render import span

log = logging.getLogger(__name__)
REPORT_MD = "mechint_report.md"


def write_report(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``mechint_report.md`` plus plots into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    analysis_names()  # the built-in analyses are registered
    results: dict[str, dict[str, Any]] = doc.get("results", {})
    ok = {name: {la: r for la, r in per.items() if isinstance(r, dict) and not r.get("skipped")}
          for name, per in results.items()}
    lines = ["# mechray interpretability report", "",
             f"- store: `{doc.get('store')}`", f"- created: {doc.get('created')}",
             f"- analyses: {', '.join(results) or 'none'}",
             f"- eval inputs: {doc.get('eval_inputs')} ({doc.get('eval_inputs_source')})", "",
             "| layer | features | rows | shards | steps |", "| --- | --- | --- | --- | --- |"]
    for layer, info in doc.get("layers", {}).items():
        steps = info.get("steps", [])
        lines.append(f"| `{layer}` | {info.get('feature_shape')} | {info.get('rows')} | "
                     f"{info.get('shards')} | {span(steps)} |")
    for name, per in results.items():
        lines += ["", f"## {name}", ""]
        rows = [(la, r) for la, r in ok[name].items()]
        cls = REGISTRY.get(name)
        columns = list(cls.columns) if cls is not None and cls.columns else _generic_columns(rows)
        if rows:
            lines.append("| layer | " + " | ".join(c for c, _ in columns) + " |")
            lines.append("| --- |" + " --- |" * len(columns))
            for layer, r in rows:
                cells = " | ".join(_cell(fn, r) for _, fn in columns)
                lines.append(f"| `{layer}` | {cells} |")
        lines += [f"- `{la}`: **warning** — {w}" for la, r in rows for w in r.get("warnings") or []]
        lines += getattr(cls, "report_lines", lambda rows: [])(rows) if rows else []
        plot = cls.plot if cls is not None and cls.plot_file else None
        if plot and rows:
            png = _safe_plot(plot, ok[name], out, name)
            if png:
                lines += ["", f"![{name}]({png})"]
        lines += contexts_markdown(name, ok[name])
        lines += lens_markdown(ok[name])
        for layer, r in per.items():
            if not isinstance(r, dict) or r.get("skipped"):
                reason = r.get("reason") if isinstance(r, dict) else "no result"
                lines.append(f"- `{layer}`: skipped — {reason}")
    path = out / REPORT_MD
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("mechray: report written to %s", path)
    return path


# --- tables ------------------------------------------------------------------------------------
def _generic_columns(rows: list[tuple[str, dict]]) -> list[tuple[str, Callable]]:
    keys = [k for k, v in (rows[0][1].items() if rows else []) if isinstance(v, (int, float, str))]
    return [(k, (lambda r, k=k: r.get(k))) for k in keys[:8]]


def _cell(fn: Callable[[dict], Any], r: dict) -> str:
    try:
        v = fn(r)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return "—"
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"`{v}`" if isinstance(v, str) and "/" in v else str(v)


# --- plots -------------------------------------------------------------------------------------
def _safe_plot(plot: Callable, per_layer: dict[str, dict], out: Path, name: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig = plot(per_layer, plt)
        if fig is None:
            return None
        fname = analysis_class(name).plot_file
        if fname is None:
            return None
        fig.savefig(out / fname, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return fname
    except Exception as exc:  # a plot never breaks the report
        log.warning("mechray: %s plot skipped: %s", name, exc)
        plt.close("all")
        return None
