"""`dolly serve`: a model behind an OpenAI-compatible API on Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.configs import address_option, config_option, load_config, option, settings_help
from contract.errors import UserError
from services.config import ServeConfig

EPILOG = settings_help(ServeConfig)


def serve(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any setting below, e.g. deployment.max_replicas=4"
    ),
    model: Optional[str] = option(ServeConfig, "model"),
    config: Optional[Path] = config_option(),
    registry: Optional[Path] = option(ServeConfig, "registry"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="no API keys: local demos only"),
    host: str = typer.Option("127.0.0.1", help="HTTP address to listen on (0.0.0.0 to reach it from other machines)"),
    port: int = typer.Option(8000, help="HTTP port"),
    detach: bool = typer.Option(False, help="deploy onto the cluster at --address and return (e.g. to switch versions in place)"),
    ui: bool = typer.Option(False, "--ui", help="also serve the Gradio chat page at /ui/, beside the API"),
    address: Optional[str] = address_option(),
) -> None:
    """Serve an exported model: POST /v1/completions, /v1/chat/completions (streaming or not), GET /v1/models and /healthz. API keys come from $DOLLY_API_KEYS or auth.api_keys_file.

    Deploying another version under the same app_name onto a running cluster (--address, --detach) replaces the replicas in place, without failing requests.

    Example: DOLLY_API_KEYS=secret dolly serve --model dolly@latest

    LoRA adapters side by side on their base, picked by each request's `model`: dolly serve adapters=[dolly-support,dolly-legal]
    """
    from services.auth import INSECURE_BANNER, ApiKeys
    from services.config import what_to_serve

    flags = dict(model=model, registry=registry, auth={"insecure_no_auth": True} if insecure_no_auth else None)
    settings = load_config(ServeConfig, config, flags, overrides or [])
    if detach and not address:
        raise UserError("--detach needs --address (or RAY_ADDRESS): an embedded cluster ends with this command")
    served = what_to_serve(settings)  # fail before the heavy imports and Ray's start
    if not settings.auth.insecure_no_auth and not address:
        ApiKeys(settings.auth)  # the replicas read the keys where they run: here, on an embedded cluster

    from cluster.connect import ray_session
    from loop.deploy import STOP_HINT, serving

    console = Console(stderr=True)
    if settings.auth.insecure_no_auth:
        console.print(f"[bold red]{INSECURE_BANNER}[/]", highlight=False)
    what = f"{', '.join(settings.adapters)} (LoRA adapters) on {served.version}" if settings.adapters else settings.model
    with ray_session(address), serving(settings, host, port, ui=ui, block=not detach, console=console) as deployed:
        console.print(f"[green]Serving[/] {what} at {deployed.shown(deployed.api_url)}")
        if deployed.page_url:
            console.print(f"[green]Chat page[/] at {deployed.shown(deployed.page_url)}")
        if not detach:
            console.print(STOP_HINT)
