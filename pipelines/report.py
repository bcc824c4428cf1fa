"""What a person sees after preparing data: a short report and a token-length histogram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import pandas as pd
from rich.console import Console
from rich.table import Table


def print_report(manifest: dict, data_dir: Path, console: Console) -> None:
    counts = manifest["counts"]
    rejected = sum(counts["rejected"].values())
    reconciled = counts["read"] == counts["kept"] + rejected
    console.print(
        f"[bold]Records[/] read {counts['read']:,} = kept {counts['kept']:,} + rejected {rejected:,} "
        + ("[green](reconciled)[/]" if reconciled else "[red](DO NOT RECONCILE)[/]")
    )
    if counts["rejected"]:
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in counts["rejected"].items())
        console.print(f"[bold]Rejected[/] {reasons}  ->  {Path(data_dir) / manifest['files']['rejects']}")
    if counts["truncated"]:
        console.print(f"[bold]Truncated[/] {counts['truncated']:,} over-length examples")
    max_length = manifest["max_length"]
    console.print(
        f"[bold]Max length[/] {max_length['value']} tokens (from {max_length['from']}), over-length: {manifest['config']['length_policy']}"
    )

    splits = manifest["splits"]
    table = Table(title="Examples per category and split", title_justify="left")
    table.add_column("category")
    for split in splits:
        table.add_column(split, justify="right")
    categories = sorted({c for s in splits.values() for c in s["by_category"]})
    for category in categories:
        table.add_row(category, *(f"{s['by_category'].get(category, 0):,}" for s in splits.values()))
    table.add_row("[bold]total[/]", *(f"[bold]{s['examples']:,}[/]" for s in splits.values()))
    console.print(table)

    tokens = Table(title="Tokens per example", title_justify="left")
    for column in ("split", "total", "response (loss)", "mean", "p50", "p95", "max"):
        tokens.add_column(column, justify="right" if column != "split" else "left")
    for name, s in splits.items():
        tokens.add_row(
            name,
            f"{s['tokens']:,}",
            f"{s['response_tokens']:,}",
            f"{s['mean_tokens']}",
            str(s["p50_tokens"]),
            str(s["p95_tokens"]),
            str(s["max_tokens"]),
        )
    console.print(tokens)
    if manifest.get("packing"):
        p = manifest["packing"]
        console.print(
            f"[bold]Packing[/] {p['examples']:,} training examples in {p['rows']:,} rows, {p['fill']:.1%} of row capacity filled"
        )
    console.print(
        f"[bold]Tokenizer[/] {manifest['tokenizer']['name_or_path']} (sha256 {manifest['tokenizer']['fingerprint'][:12]}), "
        f"special tokens {manifest['tokenizer']['special_tokens']}"
    )
    console.print(f"[bold]Histogram[/] {Path(data_dir) / manifest['files']['plot']}")


def plot_token_lengths(kept: pd.DataFrame, max_length: int, path: Path) -> Path:
    """One small histogram per category (columns `category`, `n_tokens`), on a shared x axis,
    with the length limit marked: shows at a glance which kinds of task are long."""
    categories = sorted(kept["category"].unique()) or ["(none)"]
    cols = 4
    rows = (len(categories) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), sharex=True, squeeze=False)
    upper = max(int(kept["n_tokens"].max()) if len(kept) else 1, max_length)
    bins = [x * upper / 50 for x in range(51)]
    for ax, category in zip(axes.flat, categories):
        lengths = kept.loc[kept["category"] == category, "n_tokens"]
        ax.hist(lengths, bins=bins, color="#3b75af")
        ax.axvline(max_length, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_title(f"{category} (n={len(lengths):,}, median {int(lengths.median()) if len(lengths) else 0})", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("examples (log)", fontsize=8)
    for ax in list(axes.flat)[len(categories) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("tokens per example")
    fig.suptitle(f"Token lengths per category (dashed: max_length {max_length})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
