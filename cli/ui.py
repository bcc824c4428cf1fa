"""`dolly ui`: the Gradio chat page, standalone, in front of a running Serve API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import config_option, load_config, option, settings_help
from ui.config import UIConfig


def ui(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any setting below"),
    api_url: Optional[str] = option(UIConfig, "api_url"),
    api_key_file: Optional[Path] = option(UIConfig, "api_key_file"),
    auth_file: Optional[Path] = option(UIConfig, "auth_file"),
    host: Optional[str] = option(UIConfig, "host"),
    port: Optional[int] = option(UIConfig, "port"),
    config: Optional[Path] = config_option(),
) -> None:
    """Open the chat page in front of the Serve API: streamed answers, multi-turn history, a context
    box for Dolly's Input:, and one example per task kind.

    Example: dolly ui --api-url http://127.0.0.1:8000/v1 --api-key-file key.txt
    """
    from ui.page import launch_page

    settings = load_config(
        UIConfig,
        config,
        dict(api_url=api_url, api_key_file=api_key_file, auth_file=auth_file, host=host, port=port),
        overrides or [],
    )
    print(f"Chat page: http://{settings.host}:{settings.port}  (API: {settings.api_url}; Ctrl-C stops it)")
    launch_page(settings)


EPILOG = settings_help(UIConfig)
