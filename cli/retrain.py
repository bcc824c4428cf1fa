"""`dolly retrain`: train on the corpus plus new records, evaluate against the serving version,
and promote and hot-swap only past the gate (loop/retrain.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import address_option, config_option, load_config, option, settings_help
from cli.screen import log_to_file
from loop.configs import RetrainConfig

EPILOG = settings_help(RetrainConfig)


def retrain(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any setting below, e.g. gate.min_improvement=0.05 train.max_steps=50"
    ),
    config: Optional[Path] = config_option("YAML file of settings (`dolly up` writes runs/up/retrain.yaml)"),
    new_records: Optional[list[Path]] = option(RetrainConfig, "new_records", "--new-records"),
    feedback: Optional[str] = option(RetrainConfig, "feedback"),
    address: Optional[str] = address_option(
        "Ray cluster to train on and whose serving app to swap (default: an embedded local one)"
    ),
) -> None:
    """Retrain, then promote only if better: the candidate and the serving version are scored on
    the same held-out split; the candidate becomes NAME@latest, and replaces the running app's
    model in place, only when it beats the serving one on the gate's metric by its margin.
    The decision and both scores go to WORKDIR/report.json (a kept version is a result, not an
    error: the exit status is 0 either way).

    Example: dolly retrain --config runs/up/retrain.yaml --new-records new.jsonl --address 127.0.0.1:6379
    """
    flags = dict(new_records=new_records or None, feedback=feedback)
    settings = load_config(RetrainConfig, config, flags, overrides or [])
    log_to_file("retrain")
    from loop.retrain import retrain as run_retrain

    run_retrain(settings, address=address)
