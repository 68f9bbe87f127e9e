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

import numpy as np

log = logging.getLogger(__name__)
REPORT_MD = "mechint_report.md"
TOP_BARS = 10


def write_report(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``mechint_report.md`` plus plots into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
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
                     f"{info.get('shards')} | {_span(steps)} |")
    for name, per in results.items():
        lines += ["", f"## {name}", ""]
        rows = [(la, r) for la, r in ok[name].items()]
        columns = COLUMNS.get(name, _generic_columns(rows))
        if rows:
            lines.append("| layer | " + " | ".join(c for c, _ in columns) + " |")
            lines.append("| --- |" + " --- |" * len(columns))
            for layer, r in rows:
                cells = " | ".join(_cell(fn, r) for _, fn in columns)
                lines.append(f"| `{layer}` | {cells} |")
        plot = PLOTS.get(name)
        if plot and rows:
            png = _safe_plot(plot, ok[name], out, name)
            if png:
                lines += ["", f"![{name}]({png})"]
        for layer, r in per.items():
            if not isinstance(r, dict) or r.get("skipped"):
                reason = r.get("reason") if isinstance(r, dict) else "no result"
                lines.append(f"- `{layer}`: skipped — {reason}")
    path = out / REPORT_MD
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("mechray: report written to %s", path)
    return path


# --- tables ------------------------------------------------------------------------------------
def _mean(key: str) -> Callable[[dict], Any]:
    return lambda r: float(np.mean(r[key]))


def _top(r: dict) -> str:
    return ", ".join(f"{e['neuron']}: {e['effect']:.3g}" for e in r.get("ranked", [])[:5])


COLUMNS: dict[str, list[tuple[str, Callable[[dict], Any]]]] = {
    "neuron": [("samples", lambda r: r["num_samples"]), ("neurons", lambda r: r["num_neurons"]),
               ("mean sparsity", _mean("sparsity")), ("dead", lambda r: r["dead_count"]),
               ("mean std", _mean("std")), ("max", lambda r: max(r["max"]))],
    "feature": [("PC1 ratio", lambda r: r["explained_variance_ratio"][0]),
                ("cumulative ratio", lambda r: sum(r["explained_variance_ratio"])),
                ("components", lambda r: r["n_components"]),
                ("clusters", lambda r: r["clustering"].get("n_clusters", "skipped")),
                ("silhouette", lambda r: r["clustering"].get("silhouette")),
                ("file", lambda r: r.get("components_path"))],
    "sae": [("l0", lambda r: r["l0"]), ("explained variance", lambda r: r["explained_variance"]),
            ("mse", lambda r: r["mse"]), ("dead fraction", lambda r: r["dead_fraction"]),
            ("latents", lambda r: r.get("n_latents")),
            ("weights", lambda r: r.get("weights_path"))],
    "causal": [("method", lambda r: r.get("method")), ("metric", lambda r: r.get("metric")),
               ("layer effect", lambda r: r.get("layer_effect")), ("top neurons", _top)],
    "circuit": [("layer effect", lambda r: r.get("layer_effect")), ("top neurons", _top)],
    "dynamics": [("steps", lambda r: _span(r["steps"])),
                 ("min overlap", lambda r: min(r["subspace_overlap"])),
                 ("CKA", lambda r: _series(r["cka"])),
                 ("pairing", lambda r: ", ".join(sorted(set(r["cka_pairing"]))))],
}


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


def _series(values: list) -> str:
    known = [v for v in values if v is not None]
    if len(values) <= 6:
        return ", ".join("—" if v is None else f"{v:.3f}" for v in values)
    return f"min {min(known):.3f}, last {known[-1]:.3f}" if known else "—"


def _span(steps: list) -> str:
    if not steps:
        return "—"
    if len(steps) > 3:
        return f"{steps[0]}…{steps[-1]} ({len(steps)})"
    return ", ".join(map(str, steps))


# --- plots -------------------------------------------------------------------------------------
def _safe_plot(plot: Callable, per_layer: dict[str, dict], out: Path, name: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig = plot(per_layer, plt)
        if fig is None:
            return None
        fname = FILES[name]
        fig.savefig(out / fname, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return fname
    except Exception as exc:  # a plot never breaks the report
        log.warning("mechray: %s plot skipped: %s", name, exc)
        plt.close("all")
        return None


def _grid(plt, n: int, cols: int, w: float = 4.0, h: float = 2.6):
    fig, axes = plt.subplots(n, cols, figsize=(w * cols, h * n), squeeze=False)
    return fig, axes


def _plot_feature(per: dict, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, r in per.items():
        ratio = np.cumsum(r["explained_variance_ratio"])
        ax.plot(np.arange(1, len(ratio) + 1), ratio, marker="o", ms=3, label=layer)
    ax.set(xlabel="principal components", ylabel="cumulative explained variance ratio",
           ylim=(0, 1.02), title="PCA explained variance")
    ax.legend(fontsize=7)
    return fig


def _plot_neuron(per: dict, plt):
    fig, axes = _grid(plt, len(per), 2)
    for (layer, r), (a, b) in zip(per.items(), axes):
        edges, counts = np.asarray(r["histogram"]["edges"]), np.asarray(r["histogram"]["counts"])
        used = np.flatnonzero(counts)
        lo, hi = (used[0], used[-1] + 1) if len(used) else (0, len(counts))
        a.stairs(counts[lo:hi], edges[lo:hi + 1], fill=True)
        a.set_xscale("symlog", linthresh=1e-3)
        span = max(abs(edges[lo]), abs(edges[hi]))
        ticks = [t for t in (1e-2, 1, 1e2, 1e4) if t <= span * 1.01]
        a.set_xticks([-t for t in ticks[::-1]] + [0] + ticks)
        a.tick_params(axis="x", labelsize=7)
        a.set_title(f"{layer}: activation values", fontsize=9)
        a.set_ylabel("rows x neurons", fontsize=8)
        b.hist(r["sparsity"], bins=20, range=(0, 1))
        b.set_title(f"{layer}: sparsity per neuron", fontsize=9)
        b.set_xlabel("fraction |a| <= eps", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_sae(per: dict, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for layer, r in per.items():
        freq = [f for f in r.get("latent_log10_frequency") or [] if f is not None]
        if freq:
            ax.hist(freq, bins=30, histtype="step", label=layer)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="log10 latent firing frequency", ylabel="latents", title="SAE latent density")
    ax.legend(fontsize=7)
    return fig


def _plot_ranked(per: dict, plt):
    per = {la: r for la, r in per.items() if r.get("ranked")}
    if not per:
        return None
    fig, axes = _grid(plt, len(per), 1, w=6.0)
    for (layer, r), (ax,) in zip(per.items(), axes):
        top = r["ranked"][:TOP_BARS]
        ax.bar(np.arange(len(top)), [e["effect"] for e in top])
        ax.set_xticks(np.arange(len(top)), [str(e["neuron"]) for e in top])
        ax.set(title=f"{layer} (layer effect {r.get('layer_effect', float('nan')):.3g})",
               xlabel="neuron", ylabel="effect")
    fig.tight_layout()
    return fig


def _plot_dynamics(per: dict, plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layer, r in per.items():
        later = [t for _, t in r["pairs"]]
        a.plot(later, r["subspace_overlap"], marker="o", ms=3, label=layer)
        cka = [np.nan if c is None else c for c in r["cka"]]
        if not all(np.isnan(cka)):
            b.plot(later, cka, marker="o", ms=3, label=layer)
    a.set(xlabel="step", ylabel="overlap with previous step", ylim=(0, 1.02),
          title=f"top-{next(iter(per.values()))['n_components']} principal subspace overlap")
    b.set(xlabel="step", ylabel="linear CKA with previous step", ylim=(0, 1.02),
          title="linear CKA (paired rows only)")
    a.legend(fontsize=7)
    if b.lines:
        b.legend(fontsize=7)
    else:
        b.text(0.5, 0.5, "no paired rows between steps\n(capture a fixed probe batch\n"
               "with save_inputs=True)", ha="center", va="center", transform=b.transAxes)
    return fig


PLOTS = {"feature": _plot_feature, "neuron": _plot_neuron, "sae": _plot_sae,
         "causal": _plot_ranked, "circuit": _plot_ranked, "dynamics": _plot_dynamics}
FILES = {"feature": "explained_variance.png", "neuron": "neuron_activations.png",
         "sae": "sae_latent_density.png", "causal": "causal_effects.png",
         "circuit": "circuit_effects.png", "dynamics": "dynamics.png"}
