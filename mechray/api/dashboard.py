"""The dashboard: one self-contained HTML page (inline CSS, JS and SVG plots; no CDN).

Usage::

    from mechray.api.dashboard import page

    html = page()          # what GET / and GET /interpret/dashboard return

The page fetches ``/interpret/layers`` and ``/interpret/shards``, lists them, and for the chosen
layer runs every analysis through ``POST /interpret`` (polling ``/interpret/jobs/{id}`` for the
SAE), drawing neuron statistics, top-activating rows, explained variance, SAE metrics (with
``converged`` and every warning of the fit) and latent density,
causal and circuit rankings and training dynamics as inline SVG.  When the server has a
tokenizer (``mechray serve --tokenizer``), the top-activating rows of neurons and of SAE latents
are shown as text: the token highlighted with its window of tokens around it (the text comes
from the data, so it is only ever set as text, never parsed as markup).  A token field sends
``Authorization: Bearer`` when the server sets ``$MECHRAY_API_TOKEN``.  Nothing is loaded from
outside the server.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

HTML = Path(__file__).with_name("dashboard.html")


@lru_cache(maxsize=1)
def page() -> str:
    """The dashboard HTML (read once from ``mechray/dashboard.html``)."""
    return HTML.read_text(encoding="utf-8")
