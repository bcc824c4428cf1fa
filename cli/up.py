"""`dolly up`: the whole loop with one command (loop/up.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import load_config, settings_help
from loop.configs import UpConfig

EPILOG = settings_help(UpConfig)


def up(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any setting below, e.g. max_steps=40 train.zero_stage=3"),
    data: Optional[str] = typer.Option(None, help="corpus: file, folder, URI or Hub id (default: $DOLLY_DATA, else the Hub's dolly-15k if reachable, else a built-in sample)"),
    base_model: Optional[str] = typer.Option(None, help="model to fine-tune (default: smollm2-135m-instruct; Dolly: EleutherAI/pythia-2.8b)"),
    preset: Optional[str] = typer.Option(None, help="hardware preset: cpu (default), a100, a10, v100, h100"),
    port: Optional[int] = typer.Option(None, help="HTTP port of the API and the page (default: 8000)"),
    smoke: bool = typer.Option(False, "--smoke", help="a quick check that everything works: 2 training steps, 8 examples scored, greedy answers of 32 tokens"),
    no_browser: bool = typer.Option(False, "--no-browser", help="do not open the chat page in a browser"),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file of settings"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster to run on (default: an embedded local one)"),
) -> None:
    """Prepare the corpus, score the base model, fine-tune it with Ray Train + DeepSpeed, score it
    again, register it, and serve it with the chat page, printing the URLs and the API key.
    Everything unchanged since the last run is reused. Ctrl-C stops serving.

    Example: dolly up --data ../shared/data/databricks-dolly-15k.jsonl

    Dolly's real recipe: dolly up --base-model EleutherAI/pythia-2.8b --preset a100 --address ray://HEAD:10001
    """
    flags = dict(data=data, base_model=base_model, preset=preset, port=port,
                 open_browser=False if no_browser else None,
                 **(dict(max_steps=2, eval_examples=8, behaviour={"modes": ["greedy"], "examples": 8, "max_new_tokens": 32})
                    if smoke else {}))
    settings = load_config(UpConfig, config, flags, overrides or [])
    from loop.up import up as run_up

    run_up(settings, address=address)
