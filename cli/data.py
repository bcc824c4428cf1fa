"""`dolly data ...`: prepare the corpus into training shards, and inspect prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cli.configs import load_config, settings_help
from pipelines.configs import PrepareConfig

app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)


@app.command(epilog=settings_help(PrepareConfig))
def prepare(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any setting below, e.g. test_size=200 pack=true"),
    source: Optional[str] = typer.Option(None, help="corpus: Hub dataset id, .jsonl/.json/.parquet file or folder, s3:// or gs:// URI"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder for shards, manifest, rejects and plots"),
    tokenizer: Optional[str] = typer.Option(None, help="base model's tokenizer: Hub id or local folder"),
    max_length: Optional[int] = typer.Option(None, help="longest example in tokens (default: from the model config)"),
    test_size: Optional[int] = typer.Option(None, help="held-out examples"),
    on_bad: Optional[str] = typer.Option(None, help="skip: leave bad records out (listed in rejects.jsonl); fail: stop at them"),
    pack: Optional[bool] = typer.Option(None, "--pack/--no-pack", help="pack several examples per training row"),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file of settings"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster to run on (default: an embedded local one)"),
) -> None:
    """Validate, format and tokenize a corpus into train/test Parquet shards with a manifest.

    Example: dolly data prepare --source ../shared/data/databricks-dolly-15k.jsonl --tokenizer ../shared/tokenizer/pythia
    """
    from cluster.connect import ray_session
    from pipelines.prepare import prepare as run_prepare

    flags = dict(source=source, output_dir=out, tokenizer=tokenizer, max_length=max_length, test_size=test_size,
                 on_bad=on_bad, pack=pack)
    settings = load_config(PrepareConfig, config, flags, overrides or [])
    with ray_session(address):
        run_prepare(settings)


@app.command()
def stats(
    data_dir: Path = typer.Argument(Path("runs/data"), help="a folder written by `dolly data prepare`"),
    tokenizer: Optional[str] = typer.Option(None, help="also check the shards were made with this tokenizer"),
) -> None:
    """Verify prepared shards against their manifest and print their report."""
    from contract.models import load_tokenizer
    from pipelines.manifest import verify_manifest
    from pipelines.report import print_report

    console = Console()
    manifest = verify_manifest(data_dir, load_tokenizer(tokenizer) if tokenizer else None)
    print_report(manifest, data_dir, console)
    console.print(f"[green]Verified[/] {len(manifest['shards'])} shard(s) in {data_dir} against their manifest"
                  + (f" and tokenizer {tokenizer}" if tokenizer else ""))
