"""`dolly up`: the whole loop with one command (loop/up.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import address_option, config_option, load_config, option, settings_help
from cli.screen import log_to_file
from loop.configs import UpConfig

EPILOG = settings_help(UpConfig)


def up(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any setting below, e.g. train.max_steps=60 train.method=lora"
    ),
    data: Optional[str] = option(UpConfig, "data"),
    base_model: Optional[str] = option(UpConfig, "base_model"),
    preset: Optional[str] = option(UpConfig, "preset"),
    port: Optional[int] = option(UpConfig, "port"),
    smoke: bool = typer.Option(
        False,
        "--smoke",
        help="a quick check that everything works: 2 training steps, 8 examples scored, greedy answers of 32 tokens",
    ),
    no_browser: bool = typer.Option(False, "--no-browser", help="do not open the chat page in a browser"),
    config: Optional[Path] = config_option(),
    address: Optional[str] = address_option(),
) -> None:
    """Prepare the corpus, score the base model, fine-tune it with Ray Train + DeepSpeed, score it
    again, register it, and serve it with the chat page, printing the URLs and the API key.
    Everything unchanged since the last run is reused. Ctrl-C stops serving.

    Example: dolly up --data ../shared/data/databricks-dolly-15k.jsonl

    Dolly's real recipe, on a GPU cluster: dolly submit up --address http://HEAD:8265 base_model=EleutherAI/pythia-2.8b
    preset=a100 workdir=/mnt/dolly/up registry=/mnt/dolly/registry host=0.0.0.0
    """
    flags = dict(
        data=data,
        base_model=base_model,
        preset=preset,
        port=port,
        open_browser=False if no_browser else None,
        **(
            dict(
                train={"max_steps": 2},
                eval_examples=8,
                behaviour={"modes": ["greedy"], "examples": 8, "decoding": {"max_tokens": 32}},
            )
            if smoke
            else {}
        ),
    )
    settings = load_config(UpConfig, config, flags, overrides or [])
    log_to_file("up")
    from loop.up import up as run_up

    run_up(settings, address=address)
