"""`dolly`: one command line for the whole system. Each concept's commands live in their own
module; heavy imports (Ray, torch) happen inside commands, so `--help` stays instant."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from cli import cluster, data, feedback, k8s, retrain, serve, submit, train, ui, up
from cli import eval as eval_cli
from contract.errors import UserError

app = typer.Typer(
    help="dolly-ray: instruction-tune Pythia on databricks-dolly-15k with Ray, and serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command(name="up", epilog=up.EPILOG)(up.up)
app.add_typer(data.app, name="data")
app.command(name="train", epilog=train.EPILOG)(train.train)
app.add_typer(submit.app, name="submit")
app.command(name="serve", epilog=serve.EPILOG)(serve.serve)
app.command(name="ui", epilog=ui.EPILOG)(ui.ui)
app.command(name="eval", epilog=eval_cli.EPILOG)(eval_cli.eval_command)
app.command(name="retrain", epilog=retrain.EPILOG)(retrain.retrain)
app.add_typer(feedback.app, name="feedback")
app.add_typer(cluster.app, name="cluster")
app.add_typer(k8s.app, name="k8s")


def main() -> None:
    try:
        app()
    except UserError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
