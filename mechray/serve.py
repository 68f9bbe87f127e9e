"""The Ray Serve application's import path, kept for deploy files and users.

Usage::

    # deploy/serve_config.yaml
    import_path: mechray.serve:build_app

The application lives in :mod:`mechray.api.serve_app`.
"""

from mechray.api.serve_app import build_app, run_server

__all__ = ["build_app", "run_server"]
