"""The application configured from the environment, for tools that import a ready Application
instead of calling a builder, such as `serve build`:

    DOLLY_MODEL=dolly@3 serve build services.env:app -o serve.yaml

DOLLY_MODEL (a folder or NAME@version) is required; DOLLY_SERVE_CONFIG names a YAML file of
ServeConfig settings and DOLLY_REGISTRY the registry root. A KubeRay serveConfigV2 can use the
builder instead, with its settings as `args` (see services/app.py).
"""

import os
from pathlib import Path

from contract.settings import load_config
from services.app import build_app
from services.config import ServeConfig

_config_file = os.environ.get("DOLLY_SERVE_CONFIG")
app = build_app(
    load_config(
        ServeConfig,
        Path(_config_file) if _config_file else None,
        {"model": os.environ.get("DOLLY_MODEL"), "registry": os.environ.get("DOLLY_REGISTRY")},
        [],
    )
)
