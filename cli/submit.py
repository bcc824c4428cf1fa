"""`dolly submit ...`: run a dolly command on a Ray cluster as a Ray job."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from cli.configs import config_option, load_config, parse_overrides
from loop.configs import RetrainConfig, UpConfig
from pipelines.configs import TrainConfig

app = typer.Typer(help="Run dolly commands on a Ray cluster as Ray jobs (token auth handled).", no_args_is_help=True)


ADDRESS = typer.Option(..., envvar="RAY_ADDRESS", help="the cluster's dashboard, e.g. http://HEAD:8265")
WORKING_DIR = typer.Option(
    Path("."), exists=True, file_okay=False, help="code to run: uploaded to the cluster as the job's working dir"
)
WAIT = typer.Option(True, "--wait/--no-wait", help="stream the job's logs and exit with its status")


@app.command()
def train(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any `dolly train` setting, e.g. max_steps=100"),
    address: str = ADDRESS,
    config: Optional[Path] = config_option("YAML file of `dolly train` settings"),
    working_dir: Path = WORKING_DIR,
    wait: bool = WAIT,
) -> None:
    """Run `dolly train` on a cluster: the settings are checked here first, then travel with the job
    as `key=value` arguments. Paths in them are read on the cluster, relative to the job's working
    dir (a copy of --working-dir): give absolute or s3:// paths for data, storage and outputs.

    Example: dolly submit train --address http://head:8265 --config train.yaml num_workers=8
    """
    _submit("train", TrainConfig, config, overrides, address, working_dir, wait)


@app.command()
def retrain(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any `dolly retrain` setting, e.g. gate.min_improvement=0.05"
    ),
    address: str = ADDRESS,
    config: Optional[Path] = config_option("YAML file of `dolly retrain` settings"),
    working_dir: Path = WORKING_DIR,
    wait: bool = WAIT,
) -> None:
    """Run `dolly retrain` on a cluster, so training, evaluation, the gate and the swap all run
    there (the serving app it swaps is the one on that cluster). Paths are read on the cluster.

    Example: dolly submit retrain --address http://head:8265 --config retrain.yaml new_records=\\[/data/new.jsonl]
    """
    _submit("retrain", RetrainConfig, config, overrides, address, working_dir, wait)


@app.command()
def up(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any `dolly up` setting, e.g. preset=a100 workdir=/mnt/dolly/up"
    ),
    address: str = ADDRESS,
    config: Optional[Path] = config_option("YAML file of `dolly up` settings"),
    working_dir: Path = WORKING_DIR,
    wait: bool = WAIT,
) -> None:
    """Run `dolly up` on a cluster, its driver on the head, where the cluster's storage is: a
    driver on a laptop (Ray Client) would write the run's files to the laptop's disk, which no
    node reads. It serves until the job is stopped (`ray job stop`). Paths are read on the cluster.

    Example: dolly submit up --address http://head:8265 preset=a100 base_model=EleutherAI/pythia-2.8b workdir=/mnt/dolly/up registry=/mnt/dolly/registry host=0.0.0.0
    """
    _submit("up", UpConfig, config, overrides, address, working_dir, wait)


def _submit(
    command: str, cls, config: Path | None, overrides: list[str] | None, address: str, working_dir: Path, wait: bool
) -> None:
    load_config(cls, config, {}, overrides or [])  # a bad setting fails here, not minutes later on the cluster
    from cluster.jobs import submit

    settings = yaml.safe_load(config.read_text()) if config else {}
    settings.update(parse_overrides(overrides or []))
    arguments = [f"{key}={json.dumps(value)}" for key, value in settings.items()]  # JSON is YAML, as `key=value` reads it
    entrypoint = shlex.join(["dolly", command, *arguments])
    sys.exit(submit(address, entrypoint, working_dir.absolute(), follow=wait))
