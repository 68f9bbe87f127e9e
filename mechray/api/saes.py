"""The SAEs a server was started with: HTTP clients name them, never a path on the server.

Usage::

    from mechray.api.saes import ServedSAEs

    saes = ServedSAEs({"l3-topk": "/models/saes/layer3"})   # checked now: MechrayError if bad
    saes.public()                    # {"l3-topk": {"d_in": 384, "n_latents": 3072, ...}}
    saes.resolve("l3-topk", "encoder.layer.3", features=384)   # the server path; 4xx if wrong

``mechray serve --sae NAME=DIR`` (repeatable) and ``FastAPIIntegrationMixin(..., saes={NAME:
DIR})`` register them; ``GET /interpret/layers`` lists them under ``saes`` and an ``sae`` request
names one with ``params.pretrained``.  Each is loaded once at start-up (an SAELens directory or
a mechray ``.safetensors``) so a bad one stops the server with its name and the fix, not a
request; a request naming an unknown SAE, or one whose ``d_in`` differs from the layer's
features, is a 4xx at submission.  Answers carry the name, never the directory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from mechray.api.errors import ApiError
from mechray.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ServedSAE:
    """One registered SAE as clients see it (its path stays on the server)."""

    d_in: int
    n_latents: int
    architecture: str
    format: str                      # "saelens" | "mechray"
    hook_name: Optional[str] = None

    @property
    def weight_bytes(self) -> int:
        return 4 * (2 * self.d_in * self.n_latents + self.n_latents + self.d_in)


class ServedSAEs:
    """Name -> SAE directory, checked at start-up; see the module docstring."""

    def __init__(self, spec: Optional[dict[str, str]] = None):
        self._paths: dict[str, str] = {}
        self._info: dict[str, ServedSAE] = {}
        for name, path in (spec or {}).items():
            self._paths[name], self._info[name] = _check(name, path)

    def __bool__(self) -> bool:
        return bool(self._info)

    def names(self) -> list[str]:
        return sorted(self._info)

    def public(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(info) for name, info in sorted(self._info.items())}

    def info(self, name: Any) -> ServedSAE:
        """The registered SAE called ``name``; 422 naming the registered ones otherwise."""
        if isinstance(name, str) and name in self._info:
            return self._info[name]
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        have = (f"this server has {self.names()} (GET /interpret/layers lists them under 'saes')"
                if self._info else "this server was started with none")
        raise ApiError(422, "unknown_sae",
                       f"params.pretrained={shown} is not an SAE this server was started with; "
                       f"over HTTP it names one, never a path: {have}. Start the server with "
                       "mechray serve --sae NAME=DIR (or FastAPIIntegrationMixin(..., "
                       "saes={NAME: DIR})) to add one", valid=self.names())

    def resolve(self, name: Any, layer: str, features: int) -> str:
        """The server path of ``name`` once it fits ``layer`` (``features`` wide); 4xx if not."""
        info = self.info(name)
        if info.d_in != features:
            raise ApiError(422, "sae_layer_mismatch",
                           f"SAE {name!r} reads {info.d_in} features but layer {layer!r} has "
                           f"{features}; evaluate it on the layer it was trained on"
                           + (f" (hook_name {info.hook_name!r})" if info.hook_name else ""))
        return self._paths[name]


def parse_spec(items: Optional[list[str]]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (``mechray serve --sae``) as a dict; ConfigError naming a bad one."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--sae {item!r}: give NAME=DIR, e.g. --sae l3=./results/saes/l3")
        if name in out:
            raise ConfigError(f"--sae {name!r} is given twice; give each name once")
        out[name] = path
    return out


def _check(name: Any, path: Any) -> tuple[str, ServedSAE]:
    from mechray.analysis.sae.model import load_sae, load_saelens

    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"SAE name {str(name)[:80]!r}: use 1-64 letters, digits, '_', '.' or "
                          "'-' (clients send it as params.pretrained)")
    where = Path(str(path)).expanduser().resolve()
    try:
        if where.is_file() and where.suffix in (".safetensors", ".json"):
            sae, fmt, hook = load_sae(where), "mechray", None
        else:
            sae, cfg = load_saelens(where)
            fmt, hook = "saelens", (cfg.get("metadata") or {}).get("hook_name")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"SAE {name!r} at {where} cannot be served: {exc}; give an SAELens "
                          "directory (cfg.json + sae_weights.safetensors) or a mechray "
                          "sae .safetensors file") from None
    return str(where), ServedSAE(int(sae.d_in), int(sae.n_latents), str(sae.architecture), fmt,
                                 hook if isinstance(hook, str) else None)
