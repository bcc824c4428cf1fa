"""`dolly cluster up|down|status`: a local multi-process Ray cluster for tests and demos."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Run a local multi-process Ray cluster (a head plus worker nodes) for tests and demos.", no_args_is_help=True
)


@app.command()
def up(
    workers: int = typer.Option(1, min=0, help="worker nodes beside the head"),
    cpus_per_node: int = typer.Option(
        4, min=1, help="logical CPUs each node advertises (more than cores is fine: see cluster/connect.py)"
    ),
    port: int = typer.Option(6390, help="the head's GCS port"),
    dashboard_port: int = typer.Option(8265, help="the dashboard and Jobs API port"),
    gpus_per_node: Optional[int] = typer.Option(
        None,
        min=0,
        help="GPUs each worker node declares, present or not: Ray places work on them as on a GPU cluster "
        "(default: the GPUs Ray finds)",
    ),
) -> None:
    """Start `ray start --head` plus worker nodes; print how to use the cluster."""
    from cluster import local

    cluster = local.up(
        workers=workers, cpus_per_node=cpus_per_node, port=port, dashboard_port=dashboard_port, gpus_per_node=gpus_per_node
    )
    console = Console()
    console.print(f"[green]Cluster up[/]: {1 + workers} node(s). Dashboard and Jobs API: {cluster.dashboard_url}")
    console.print(f"  Python:  ray.init(address='{cluster.address}')")
    console.print(f"  Jobs:    dolly submit train --address {cluster.dashboard_url} --config ...")
    if cluster.token_auth:
        console.print(
            f"  Token auth is on ({local.AUTH_TOKEN} exists). Clients on this machine read the token from "
            "there in token mode: export RAY_AUTH_MODE=token (dolly's own commands set it for you)."
        )
    console.print("  Stop it: dolly cluster down")


@app.command()
def down() -> None:
    """Stop the local cluster and every process it started."""
    from cluster import local

    cluster = local.down()
    Console().print(f"[green]Stopped[/] the cluster at {cluster.address}" if cluster else "No local cluster was up.")


@app.command()
def status() -> None:
    """Whether the local cluster is up, where, and with how many nodes."""
    from cluster import local

    state = local.status()
    console = Console()
    if state.get("stale_address_removed"):
        console.print(f"[yellow]Removed a stale Ray address file[/] naming a dead head at {state['stale_address_removed']}")
    if not state["up"]:
        console.print(
            "No local cluster is up."
            + (" (its processes are gone: `dolly cluster down` cleans up)" if "address" in state else "")
        )
        raise typer.Exit(3)
    console.print(
        f"[green]Up[/]: {state['nodes_running']}/{state['nodes']} node(s) at {state['address']}, "
        f"dashboard {state['dashboard']}, token auth {'on' if state['token_auth'] else 'off'}"
    )
