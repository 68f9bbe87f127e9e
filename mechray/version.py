"""mechray's version (one place: the package, the API's /health and pyproject read it)."""

__version__ = "0.1.0"
