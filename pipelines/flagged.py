"""Does a model still make the mistakes people flagged? The corrections held out of training
(`dolly feedback hold-out`), each the answer a model gave and the better one a person wrote, scored
for one model (`dolly eval --feedback URL`):

- correction loss: nats per token of the written answers, measured as held-out loss is;
- prefers the correction: the written answer is likelier, per token, than the flagged one;
- repeats the mistake: the model's own greedy answer is closer (ROUGE-L) to the flagged answer
  than to the correction.

Read together: a candidate that learnt from other feedback should prefer more corrections and
repeat fewer mistakes than the version people flagged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel
from rich.table import Table

from contract import generation
from contract.errors import UserError
from contract.feedback import FeedbackStore
from contract.models import max_length_for
from contract.records import RecordError, validate_record
from contract.sampling import SamplingParams
from pipelines.answers import answer, record_prompt
from pipelines.behaviour import rouge_l
from pipelines.heldout import LoadedModel
from pipelines.loss import row_losses
from pipelines.tokenize import tokenize_examples

FLAGGED_ANSWERS = "flagged-answers.jsonl"


class FlaggedAnswer(BaseModel):
    """One held-out correction, and what the model scored makes of it."""

    id: int  # the feedback id (`dolly feedback list --status held_out`)
    model: str  # the model scored
    answered_by: str  # the version whose answer was flagged
    category: str
    instruction: str
    context: str
    flagged: str  # the answer people corrected
    correction: str  # the answer they wrote
    generated: str  # the model's greedy answer now
    correction_loss: float  # nats per token
    flagged_loss: float | None  # None: the flagged answer is no valid response (preparation would reject it)
    repeats_mistake: bool


class FlaggedReport(BaseModel):
    model: str
    records: int  # held-out corrections read; = scored + too_long
    scored: int
    too_long: int  # prompts that leave the model no room for an answer: not scored
    correction_loss: float  # nats per token over every scored correction (token-weighted)
    paired: int  # scored records whose flagged answer is a valid response, so the two compare
    prefers_correction: int  # of paired
    repeats_mistake: int  # of scored


def read_flagged(url: str) -> list[dict]:
    """The held-out corrections in the feedback database at `url`; none is an error that says how to hold some out."""
    rows = FeedbackStore(url).rows("held_out")
    if not rows:
        raise UserError(
            f"no corrections are held out in {url}: hold some out with `dolly feedback hold-out IDS --db {url}` "
            "(`dolly feedback list` shows the pending ones)"
        )
    return rows


def score_flagged(
    lm: LoadedModel, rows: Sequence[dict], *, batch_size: int = 8, max_new_tokens: int = generation.MAX_NEW_TOKENS, seed: int = 42
) -> tuple[FlaggedReport, list[FlaggedAnswer]]:
    """`lm` on the held-out corrections: the likelihood of each correction and of its flagged
    answer (same prompt, same category), and its greedy answer to the instruction."""
    limit = max_length_for(lm.ref, lm.tokenizer)[0]
    asked = [(row, _record(row, row["response"])) for row in rows]
    # Prompts that leave the model no room for an answer are not scored (`answer` passes them over too).
    fitting = [
        (row, record, prompt) for row, record in asked if len((prompt := record_prompt(record, lm.tokenizer))["ids"]) < limit
    ]
    fits = [row for row, _, _ in fitting]
    flagged = [(i, record) for i, row in enumerate(fits) if _valid(record := _record(row, row["answer"]))]
    losses = row_losses(
        lm,
        _rows(lm, [record for _, record, _ in fitting] + [r for _, r in flagged], limit),
        batch_size,
        f"flagged mistakes of {lm.name}",
    )
    corrected, of_flagged = losses[: len(fits)], losses[len(fits) :]
    flagged_loss = {i: nll / max(tokens, 1) for (i, _), (nll, tokens) in zip(flagged, of_flagged)}
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    generated = answer(lm, [prompt for _, _, prompt in fitting], greedy, seed, batch_size)

    answers = []
    for i, (row, (nll, tokens), said) in enumerate(zip(fits, corrected, generated)):
        answers.append(
            FlaggedAnswer(
                id=row["id"],
                model=lm.name,
                answered_by=row["model"],
                category=row["category"],
                instruction=row["instruction"],
                context=row["context"],
                flagged=row["answer"],
                correction=row["response"],
                generated=said.generated,
                correction_loss=nll / max(tokens, 1),
                flagged_loss=flagged_loss.get(i),
                repeats_mistake=rouge_l(said.generated, row["answer"]) > rouge_l(said.generated, row["response"]),
            )
        )
    tokens = sum(t for _, t in corrected)
    report = FlaggedReport(
        model=lm.name,
        records=len(rows),
        scored=len(fits),
        too_long=len(rows) - len(fits),
        correction_loss=sum(nll for nll, _ in corrected) / max(tokens, 1),
        paired=len(flagged_loss),
        prefers_correction=sum(a.correction_loss < a.flagged_loss for a in answers if a.flagged_loss is not None),
        repeats_mistake=sum(a.repeats_mistake for a in answers),
    )
    return report, answers


def _record(row: dict, response: str) -> dict[str, str]:
    return {"instruction": row["instruction"], "context": row["context"], "response": response, "category": row["category"]}


def _valid(record: dict[str, str]) -> bool:
    try:
        validate_record(json.dumps(record), None)
    except RecordError:
        return False
    return True


def _rows(lm: LoadedModel, records: list[dict[str, str]], limit: int) -> list[dict]:
    """Training-format rows (loss on the response only), cut at the model's context length."""
    return [{"input_ids": ids[:limit], "labels": labels[:limit]} for ids, labels in tokenize_examples(lm.tokenizer, records)]


def flagged_table(reports: Sequence[FlaggedReport]) -> Table:
    """One row per model: how it does on the mistakes people flagged."""
    first = reports[0]
    title = f"Flagged mistakes: {first.scored} held-out corrections" + (f" ({first.too_long} too long)" if first.too_long else "")
    table = Table(title=title, title_justify="left")
    for column in ("model", "loss on corrections", "prefers the correction", "repeats the mistake"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in reports:
        table.add_row(
            r.model, f"{r.correction_loss:.4f}", f"{r.prefers_correction} of {r.paired}", f"{r.repeats_mistake} of {r.scored}"
        )
    return table


def write_flagged(answers: Sequence[FlaggedAnswer], path: Path) -> Path:
    path.write_text("".join(a.model_dump_json() + "\n" for a in answers))
    return path
