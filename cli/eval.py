"""`dolly eval`: held-out loss per category against a base, sample answers, and optionally the
LM Evaluation Harness tasks of the dolly-v2 model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import config_option, load_config, option, settings_help
from cli.screen import log_to_file
from pipelines.configs import EvalConfig

EPILOG = settings_help(EvalConfig)


def eval_command(
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="any setting below, e.g. decoding.max_tokens=64 decoding.temperature=0"
    ),
    model: Optional[str] = option(EvalConfig, "model"),
    base: Optional[str] = option(EvalConfig, "base"),
    data_dir: Optional[Path] = option(EvalConfig, "data_dir", "--data-dir"),
    out: Optional[Path] = option(EvalConfig, "output_dir", "--out"),
    tokenizer: Optional[str] = option(EvalConfig, "tokenizer"),
    max_examples: Optional[int] = option(EvalConfig, "max_examples"),
    samples_per_category: Optional[int] = option(EvalConfig, "samples_per_category"),
    feedback: Optional[str] = option(EvalConfig, "feedback"),
    harness: Optional[bool] = option(EvalConfig, "harness", "--harness/--no-harness"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated lm-eval tasks (default: the dolly-v2 table's seven)"),
    config: Optional[Path] = config_option(),
) -> None:
    """Score a model on the prepared held-out split, per Dolly category and against a base; write
    report.json, loss_by_category.png and samples.jsonl. With --feedback, also on the corrections
    held out there: does the model still make the mistakes people flagged?

    Example: dolly eval --model dolly@latest --base EleutherAI/pythia-2.8b --data-dir runs/data
    """
    flags = dict(
        model=model,
        base=base,
        data_dir=data_dir,
        output_dir=out,
        tokenizer=tokenizer,
        max_examples=max_examples,
        samples_per_category=samples_per_category,
        feedback=feedback,
        harness=harness,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
    )
    settings = load_config(EvalConfig, config, flags, overrides or [])
    log_to_file("eval")
    from pipelines.evaluate import evaluate  # torch and transformers: imported here, so `dolly --help` stays instant

    evaluate(settings)
