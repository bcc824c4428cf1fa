"""`dolly train`: fine-tune a base model on prepared shards with Ray Train + DeepSpeed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import address_option, config_option, load_config, settings_help
from cli.screen import log_to_file
from pipelines.configs import TrainConfig

EPILOG = settings_help(TrainConfig)


def train(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any setting below, e.g. max_steps=100 zero_stage=3"
    ),
    config: Optional[Path] = config_option(),
    address: Optional[str] = address_option(),
) -> None:
    """Full fine-tuning with DeepSpeed ZeRO on Ray Train workers: preflight, verified checkpoints,
    resume, metrics, export and registration.

    Example: dolly train --config train.yaml preset=a100 num_workers=8
    """
    settings = load_config(TrainConfig, config, {}, overrides or [])  # a bad setting fails before heavy imports
    log_to_file("train")
    from cluster.connect import ray_session
    from cluster.storage import check_shared
    from pipelines.train import train as run_train

    with ray_session(address):
        # Shards, checkpoints, the export and the registry are written on one node and read on others.
        folders = ("data_dir", "output_dir", "registry", "storage_path")
        check_shared({name: getattr(settings, name) for name in folders})
        run_train(settings)
