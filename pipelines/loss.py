"""Held-out loss: token-weighted cross-entropy on the response tokens of the prepared test split
(the tokens training puts loss on), overall and per Dolly category; one model as a table, base
vs tuned as a table and a PNG."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from rich.progress import track
from rich.table import Table

from contract import IGNORE_INDEX
from contract.errors import UserError
from contract.registry import DEFAULT_ROOT
from pipelines.batches import collate
from pipelines.behaviour import ordered
from pipelines.heldout import LoadedModel, check_data, loaded_model, read_heldout
from pipelines.manifest import VerifiedData


class CategoryLoss(BaseModel):
    # A random model's perplexity overflows to inf; JSON then holds Infinity, as Python reads it.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    examples: int
    tokens: int  # response tokens scored (labels != -100)
    loss: float  # mean cross-entropy per response token, in nats
    perplexity: float


class LossReport(BaseModel):
    model: str  # display name
    overall: CategoryLoss
    by_category: dict[str, CategoryLoss]


def heldout_loss(
    model: str | LoadedModel,
    data_dir: Path | VerifiedData,
    *,
    registry: Path = DEFAULT_ROOT,
    tokenizer: str | None = None,
    batch_size: int = 8,
    max_examples: int | None = None,
    gguf_file: str | None = None,
    progress: bool = True,
) -> LossReport:
    """Mean cross-entropy per response token on `data_dir/test`, overall and per category."""
    lm = loaded_model(model, registry, tokenizer, gguf_file)
    data = check_data(data_dir, lm)
    rows = read_heldout(data.dir, max_examples)
    if not rows:
        raise UserError(f"{data.dir}/test holds no examples: prepare the data with test_size > 0")
    sums = _score(lm, rows, batch_size, progress)
    overall = [sum(column) for column in zip(*sums.values())]
    return LossReport(
        model=lm.name, overall=_category_loss(*overall), by_category={c: _category_loss(*sums[c]) for c in ordered(sums)}
    )


def _score(lm: LoadedModel, rows: list[dict], batch_size: int, progress: bool) -> dict[str, list]:
    """{category: [summed nll, response tokens, examples]}."""
    sums: dict[str, list] = defaultdict(lambda: [0.0, 0, 0])
    for row, (nll, tokens) in zip(rows, row_losses(lm, rows, batch_size, f"held-out loss of {lm.name}" if progress else None)):
        total = sums[row["category"]]
        total[0] += nll
        total[1] += tokens
        total[2] += 1
    return sums


def row_losses(lm: LoadedModel, rows: list[dict], batch_size: int, progress: str | None = None) -> list[tuple[float, int]]:
    """(summed nll, response tokens) of each row (input_ids, labels), in the order given."""
    model = lm.model
    # Similar lengths batched together waste less compute on padding; each row's sum does not depend on order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    losses: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with torch.inference_mode():
        for batch in track(batches, description=progress or "", disable=progress is None):
            # Right padding with label -100, as training batches: under the causal mask no real token sees a pad.
            tensors = collate(
                {"input_ids": [rows[i]["input_ids"] for i in batch], "labels": [rows[i]["labels"] for i in batch]},
                lm.tokenizer.pad_token_id,
            )
            logits = model(
                input_ids=tensors["input_ids"].to(model.device),
                position_ids=tensors["position_ids"].to(model.device),
                use_cache=False,
            ).logits[:, :-1]
            labels = tensors["labels"][:, 1:].to(model.device)  # each token is predicted from the one before it
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            for i, row_nll, tokens in zip(batch, nll.double().sum(-1).tolist(), (labels != IGNORE_INDEX).sum(-1).tolist()):
                losses[i] = (row_nll, tokens)
    return losses


def _category_loss(nll: float, tokens: int, examples: int) -> CategoryLoss:
    loss = nll / tokens
    return CategoryLoss(examples=examples, tokens=tokens, loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf)


# ---------------------------------------------------------------------------- comparison


def loss_table(report: LossReport) -> Table:
    table = Table(title=f"Held-out loss of {report.model} (nats per response token)", title_justify="left")
    for column in ("category", "examples", "tokens", "loss", "perplexity"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, c in [*report.by_category.items(), ("[bold]overall[/]", report.overall)]:
        table.add_row(name, f"{c.examples:,}", f"{c.tokens:,}", f"{c.loss:.4f}", _number(c.perplexity, 2))
    return table


def compare(base: LossReport, tuned: LossReport) -> Table:
    """Loss and perplexity per category, base vs tuned, with the change (green: tuned is better)."""
    table = Table(title=f"Held-out loss: {base.model} -> {tuned.model} (nats per response token)", title_justify="left")
    for column in ("category", "examples", "base loss", "tuned loss", "Δ loss", "base ppl", "tuned ppl", "Δ ppl"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name in [*ordered(set(base.by_category) | set(tuned.by_category)), "overall"]:
        b = base.overall if name == "overall" else base.by_category.get(name)
        t = tuned.overall if name == "overall" else tuned.by_category.get(name)
        if b is None or t is None:  # scored on different subsets
            table.add_row(name, "", *(f"{c.loss:.4f}" if c else "-" for c in (b, t)), "", "", "", "")
            continue
        table.add_row(
            "[bold]overall[/]" if name == "overall" else name,
            f"{t.examples:,}",
            f"{b.loss:.4f}",
            f"{t.loss:.4f}",
            _delta(t.loss - b.loss, 4),
            _number(b.perplexity, 2),
            _number(t.perplexity, 2),
            _delta(t.perplexity - b.perplexity, 2),
        )
    return table


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"  # an untrained model's perplexity is astronomical


def _delta(value: float, digits: int) -> str:
    colour = "green" if value < 0 else "red" if value > 0 else "default"
    return f"[{colour}]{'+' if value > 0 else ''}{_number(value, digits)}[/]"


def plot_comparison(reports: Sequence[LossReport], path: Path) -> Path:
    """Grouped bars of held-out loss per category (and overall), one bar per model."""
    categories = [*ordered({c for r in reports for c in r.by_category}), "overall"]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(categories)), 4.5))
    for i, report in enumerate(reports):
        values = [
            report.overall.loss if c == "overall" else report.by_category[c].loss if c in report.by_category else math.nan
            for c in categories
        ]
        bars = ax.bar(
            [x + (i - (len(reports) - 1) / 2) * width for x in range(len(categories))], values, width, label=report.model
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    examples = {c: max((r.by_category[c].examples for r in reports if c in r.by_category), default=0) for c in categories[:-1]}
    examples["overall"] = max(r.overall.examples for r in reports)
    ax.set_xticks(range(len(categories)), [f"{c} ({examples[c]:,})" for c in categories], rotation=30, ha="right")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title("Held-out loss per category (lower is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
