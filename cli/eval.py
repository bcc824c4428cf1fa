"""`dolly eval`: held-out loss per category against a base, sample answers, and optionally the
LM Evaluation Harness tasks of the dolly-v2 model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.configs import load_config, settings_help
from pipelines.evaluate import EvalConfig, evaluate

EPILOG = settings_help(EvalConfig)


def eval_command(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="any setting below, e.g. max_new_tokens=64 temperature=0"),
    model: Optional[str] = typer.Option(None, help="model to evaluate: NAME@latest / NAME@N, a folder, a Hub id or a random shape"),
    base: Optional[str] = typer.Option(None, help="model to compare with, e.g. the base it was tuned from"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="a folder written by `dolly data prepare`: its test split is scored"),
    out: Optional[Path] = typer.Option(None, "--out", help="reports go to OUT/<model name>/"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer for both models (default: each model's own)"),
    max_examples: Optional[int] = typer.Option(None, help="score a deterministic subset of this many test examples"),
    samples_per_category: Optional[int] = typer.Option(None, help="test prompts per category to generate answers for (0: none)"),
    harness: Optional[bool] = typer.Option(None, "--harness/--no-harness", help="also run the LM Evaluation Harness tasks"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated lm-eval tasks (default: the dolly-v2 table's seven)"),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file of settings"),
) -> None:
    """Score a model on the prepared held-out split, per Dolly category and against a base; write
    report.json, loss_by_category.png and samples.jsonl.

    Example: dolly eval --model dolly@latest --base EleutherAI/pythia-2.8b --data-dir runs/data
    """
    flags = dict(model=model, base=base, data_dir=data_dir, output_dir=out, tokenizer=tokenizer, max_examples=max_examples,
                 samples_per_category=samples_per_category, harness=harness,
                 tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None)
    evaluate(load_config(EvalConfig, config, flags, overrides or []))
