"""Token contexts: the text around the rows that activate a neuron (or an SAE latent) most.

Usage::

    from mechray.analysis.contexts import add_contexts, decoder

    decode = decoder(tokenizer)                     # a transformers tokenizer, or any callable
    add_contexts(results, store, decode, window=8)  # {analysis: {layer: result}}, in place
    results["neuron"]["encoder.layer.3"]["top_k"]["contexts"][neuron][i]
    # {"left": "the river rose after", "token": " three", "right": "days of rain",
    #  "text": "the river rose after [[three]] days of rain", "example": 4, "position": 6,
    #  "token_id": 2093, "step": 0}

Any result holding a ``{"shard": [[...]], "row": [[...]]}`` table (unit-major: one list of top
rows per neuron or latent, like ``neuron``'s ``top_k``) gets a ``contexts`` table of the same
shape.  A row's token, position and example come from the shard's provenance companions (see
:mod:`mechray.storage.shard`), the window of ``window`` tokens each side from the shard's
``examples`` table; rows of shards captured without a mask or token ids get ``None``.  Each
shard is read once.  ``position`` is the token's index among the example's real tokens (the
same for left and right padding; provenance stores the padded position, which maps to it
through the examples table, where padding is ``-1``).  The text is data, not markup: whoever
shows it escapes it (the report and the dashboard do).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)
Decode = Callable[[list[int]], str]


def decoder(tokenizer: Any) -> Decode:
    """``ids -> text`` from a ``transformers`` tokenizer (its ``decode``, special tokens kept,
    no clean-up of spaces) or from any callable that takes a list of ids."""
    if hasattr(tokenizer, "decode"):
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
        return decode
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must be a transformers tokenizer or a callable decoding a list "
                    f"of token ids, got {type(tokenizer).__name__}")


def load_tokenizer(spec: str) -> Any:
    """A tokenizer from ``spec``: a local directory (``transformers``, offline), a
    ``package.module:name`` (a tokenizer object, or a callable returning one), or a Hugging Face
    name (may download)."""
    import importlib
    import inspect
    from pathlib import Path

    if ":" in spec and not Path(spec).exists():
        module, _, attr = spec.partition(":")
        found = getattr(importlib.import_module(module), attr)
        return found() if inspect.isclass(found) or inspect.isfunction(found) else found
    from transformers import AutoTokenizer

    if Path(spec).is_dir():
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    return AutoTokenizer.from_pretrained(spec)


def add_contexts(results: dict[str, dict[str, Any]], store: Any, decode: Decode,
                 window: int = 8) -> int:
    """Add ``contexts`` next to every top-rows table in ``results``; returns how many rows got
    text."""
    tables = [(layer, table) for per in results.values() for layer, result in per.items()
              if isinstance(result, dict) for table in _tables(result)]
    wanted: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for layer, table in tables:
        for shards, rows in zip(table["shard"], table["row"]):
            wanted[layer].update((s, int(r)) for s, r in zip(shards, rows))
    found = _lookup(store, wanted, decode, window)
    filled = 0
    for layer, table in tables:
        table["contexts"] = [[found.get((layer, s, int(r))) for s, r in zip(shards, rows)]
                             for shards, rows in zip(table["shard"], table["row"])]
        filled += sum(c is not None for unit in table["contexts"] for c in unit)
    return filled


def _tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in result.values() if isinstance(v, dict) and
            isinstance(v.get("shard"), list) and isinstance(v.get("row"), list) and
            all(isinstance(u, list) for u in v["shard"])]


def _lookup(store: Any, wanted: dict[str, set[tuple[str, int]]], decode: Decode,
            window: int) -> dict[tuple[str, str, int], Optional[dict[str, Any]]]:
    by_shard: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for layer, refs in wanted.items():
        for shard, row in refs:
            by_shard[shard].append((layer, row))
    entries = {e["file"]: e for e in store.shards()}
    out: dict[tuple[str, str, int], Optional[dict[str, Any]]] = {}
    for shard, layer_rows in by_shard.items():
        entry = entries.get(shard)
        if entry is None or not entry.get("provenance"):
            continue
        payload = store.load(entry)
        table = payload.get("examples")
        steps = payload.get("metadata", {}).get("example_steps")
        for layer, row in layer_rows:
            prov = payload.get("provenance", {}).get(layer)
            if prov is None or table is None or not 0 <= row < len(prov["example"]):
                continue
            ex, pos = int(prov["example"][row]), int(prov["position"][row])
            full = [int(t) for t in table[ex].tolist()] if 0 <= ex < len(table) else []
            real = [i for i, t in enumerate(full) if t >= 0]   # left or right padding alike
            ids = [full[i] for i in real]
            step = int(steps[ex]) if steps is not None else None
            at = real.index(pos) if 0 <= pos < len(full) and full[pos] >= 0 else -1
            if not ids or at < 0:     # a per-example row (or a position that is padding)
                out[(layer, shard, row)] = None if not ids else {
                    "left": "", "token": "", "right": decode(ids[: 2 * window]), "example": ex,
                    "position": pos, "token_id": -1, "text": decode(ids[: 2 * window]),
                    "step": step}
                continue
            lo, hi = max(0, at - window), min(len(ids), at + window + 1)
            left, token, right = decode(ids[lo:at]), decode(ids[at:at + 1]), \
                decode(ids[at + 1:hi])
            out[(layer, shard, row)] = {
                "left": left, "token": token, "right": right,
                "text": f"{left} [[{token.strip()}]] {right}".strip(),
                "example": ex, "position": at, "token_id": ids[at], "step": step}
    return out


def name_positions(results: dict[str, dict[str, Any]], decode: Decode) -> None:
    """Give every ``positions`` entry with a ``token_id`` (``circuit``'s per-position patching)
    its ``token`` text, in place."""
    for per in results.values():
        for result in per.values():
            table = result.get("positions") if isinstance(result, dict) else None
            for entry in table if isinstance(table, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("token_id"), int):
                    entry["token"] = decode([entry["token_id"]])


# --- showing them -------------------------------------------------------------------------------
_MD_SPECIAL = set("\\`*_{}[]()#+-.!|~>")


def escape_markdown(text: str) -> str:
    """Untrusted text as literal Markdown: HTML specials as entities, Markdown punctuation
    backslash-escaped, line breaks as spaces (so it stays inside a table cell or list item)."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def markdown(name: str, per: dict[str, Any], units: int = 5, per_unit: int = 3) -> list[str]:
    """Report lines: for each layer with contexts, the ``units`` strongest units (by their top
    value) with their top ``per_unit`` contexts, the token in bold."""
    lines: list[str] = []
    for layer, result in per.items():
        for key, table in ((k, v) for k, v in result.items() if isinstance(v, dict)
                           and isinstance(v.get("contexts"), list)):
            order = list(range(len(table["contexts"])))
            values = table.get("values")
            if isinstance(values, list) and len(values) == len(order):
                order.sort(key=lambda u: -(values[u][0] if values[u] and values[u][0] is not None
                                           else float("-inf")))
            shown = [u for u in order if any(table["contexts"][u])][:units]
            if not shown:
                continue
            lines += ["", f"Top token contexts, `{layer}` ({name} `{key}`):", ""]
            label = {"neuron": "neuron", "sae": "latent"}.get(name, "unit")
            for u in shown:
                for i, ctx in enumerate(table["contexts"][u][:per_unit]):
                    if ctx is None:
                        continue
                    value = values[u][i] if isinstance(values, list) else None
                    ids = table.get("latents")
                    unit = ids[u] if isinstance(ids, list) and len(ids) == len(order) else u
                    head = f"- {label} {unit}" if i == 0 else "  -"
                    val = f" ({value:.3g})" if isinstance(value, (int, float)) else ""
                    lines.append(f"{head}{val}: {escape_markdown(ctx['left'])} "
                                 f"**{escape_markdown(ctx['token'].strip())}** "
                                 f"{escape_markdown(ctx['right'])}")
    return lines
