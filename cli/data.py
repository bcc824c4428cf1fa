"""`dolly data ...`: prepare the corpus into training shards, and inspect prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.configs import address_option, config_option, load_config, option, settings_help
from cli.screen import log_to_file
from contract import runs
from pipelines.configs import PrepareConfig

app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)


@app.command(epilog=settings_help(PrepareConfig))
def prepare(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any setting below, e.g. test_size=200 pack=true"),
    source: Optional[str] = option(PrepareConfig, "source"),
    out: Optional[Path] = option(PrepareConfig, "output_dir", "--out"),
    tokenizer: Optional[str] = option(PrepareConfig, "tokenizer"),
    max_length: Optional[int] = option(PrepareConfig, "max_length"),
    test_size: Optional[int] = option(PrepareConfig, "test_size"),
    on_bad: Optional[str] = option(PrepareConfig, "on_bad"),
    pack: Optional[bool] = option(PrepareConfig, "pack", "--pack/--no-pack"),
    config: Optional[Path] = config_option(),
    address: Optional[str] = address_option(),
) -> None:
    """Validate, format and tokenize a corpus into train/test Parquet shards with a manifest.

    Example: dolly data prepare --source ../shared/data/databricks-dolly-15k.jsonl --tokenizer ../shared/tokenizer/pythia
    """
    flags = dict(
        source=source, output_dir=out, tokenizer=tokenizer, max_length=max_length, test_size=test_size, on_bad=on_bad, pack=pack
    )
    settings = load_config(PrepareConfig, config, flags, overrides or [])
    log_to_file("prepare")
    from cluster.connect import ray_session
    from pipelines.prepare import prepare as run_prepare

    with ray_session(address):
        run_prepare(settings)


@app.command()
def stats(
    data_dir: Path = typer.Argument(runs.DATA, help="a folder written by `dolly data prepare`"),
    tokenizer: Optional[str] = typer.Option(None, help="also check the shards were made with this tokenizer"),
) -> None:
    """Verify prepared shards against their manifest and print their report."""
    from contract.models import load_tokenizer
    from pipelines.manifest import verify_manifest
    from pipelines.report import print_report

    console = Console()
    manifest = verify_manifest(data_dir, load_tokenizer(tokenizer) if tokenizer else None)
    print_report(manifest, data_dir, console)
    console.print(
        f"[green]Verified[/] {len(manifest['shards'])} shard(s) in {data_dir} against their manifest"
        + (f" and tokenizer {tokenizer}" if tokenizer else "")
    )
