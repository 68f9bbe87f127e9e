"""API: the interpretation service over HTTP, on any FastAPI app or as a Ray Serve application.

``routes`` (the endpoints and :class:`FastAPIIntegrationMixin`) → ``service`` (the interpreter
behind them, a facade over ``store_view`` (the store, its manifest parsed once per change),
``planner`` (request → typed plan: every check, the cost), ``result_cache`` (results bounded in
bytes) and ``upload_store`` (uploads as private stores)) with ``schema`` (request/response
models), ``uploads`` and ``header`` (safe parsing, checked from the header before anything is
built), ``cost`` (limits), ``jobs`` (202 + polling), ``errors`` (JSON error bodies),
``dashboard`` (the page) and ``serve_app`` (the Ray Serve deployments; import path
``mechray.serve:build_app``).

May import: ``mechray.analysis``, ``mechray.storage``, ``mechray.config``, ``mechray.errors``.
Nothing imports ``mechray.api`` except the CLI and the top-level lazy names.
"""
