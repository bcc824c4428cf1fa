"""`dolly feedback ...`: review the ratings and better answers people sent from the chat page;
export the approved ones as a corpus for `dolly retrain --new-records`, and hold corrections of
the model's mistakes out of training, for `dolly eval --feedback` to check later models against."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from contract.environment import FEEDBACK_URL_ENV
from contract.errors import UserError
from contract.feedback import DEFAULT_URL, STATUSES, FeedbackStore

app = typer.Typer(help="Review what people wrote on the chat page, and export it for retraining.", no_args_is_help=True)

DB_HELP = f"the feedback database, as serving's feedback.url: a SQLAlchemy URL (default: ${FEEDBACK_URL_ENV}, else {DEFAULT_URL})"


def _short(text: str | None, width: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("list")
def list_items(
    status: str = typer.Option("pending", help=f"written answers that are {', '.join(STATUSES)}; or 'ratings'"),
    db: str = typer.Option(DEFAULT_URL, envvar=FEEDBACK_URL_ENV, help=DB_HELP, show_default=False),
) -> None:
    """List the written answers waiting for review (or in another status, or the bare ratings)."""
    if status not in (*STATUSES, "ratings"):
        raise UserError(f"--status {status!r}: choose one of {', '.join(STATUSES)} or 'ratings'")
    store = FeedbackStore(db)
    rows = [r for r in store.rows() if r["status"] is None] if status == "ratings" else store.rows(status)
    table = Table("id", "when", "model", "rating", "category", "instruction", "the model's answer", "written answer")
    for r in rows:
        when = r["created_at"].strftime("%Y-%m-%d %H:%M")
        table.add_row(
            str(r["id"]),
            when,
            r["model"],
            r["rating"] or "",
            r["category"] or "",
            _short(r["instruction"]),
            _short(r["answer"]),
            _short(r["response"]),
        )
    console = Console()
    console.print(table)
    counts = store.counts()
    console.print(
        f"{len(rows)} {status}. In all: {counts['up']} up, {counts['down']} down; written answers "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    )


def _review(status: str, ids: list[int] | None, every: bool, db: str) -> list[int]:
    if bool(ids) == every:
        raise UserError("name the ids to review (see `dolly feedback list`), or pass --all for every pending one")
    try:
        changed = FeedbackStore(db).review(status, None if every else ids)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    done = {"approved": "Approved", "rejected": "Rejected", "held_out": "Held out"}[status]
    Console().print(f"{done} {len(changed)}: {', '.join(map(str, changed)) or 'none was pending'}")
    return changed


@app.command()
def approve(
    ids: Optional[list[int]] = typer.Argument(None, help="ids of pending written answers"),
    every: bool = typer.Option(False, "--all", help="every pending one"),
    db: str = typer.Option(DEFAULT_URL, envvar=FEEDBACK_URL_ENV, help=DB_HELP, show_default=False),
) -> None:
    """Approve written answers: `dolly feedback export` will include them."""
    _review("approved", ids, every, db)


@app.command()
def reject(
    ids: Optional[list[int]] = typer.Argument(None, help="ids of pending written answers"),
    every: bool = typer.Option(False, "--all", help="every pending one"),
    db: str = typer.Option(DEFAULT_URL, envvar=FEEDBACK_URL_ENV, help=DB_HELP, show_default=False),
) -> None:
    """Reject written answers: they stay in the database, out of every export."""
    _review("rejected", ids, every, db)


@app.command("hold-out")
def hold_out(
    ids: Optional[list[int]] = typer.Argument(None, help="ids of pending written answers that correct the model's answer"),
    every: bool = typer.Option(False, "--all", help="every pending one that corrects an answer of the model"),
    db: str = typer.Option(DEFAULT_URL, envvar=FEEDBACK_URL_ENV, help=DB_HELP, show_default=False),
) -> None:
    """Hold corrections out of training, as a test of the mistakes people flagged: `dolly eval
    --feedback` scores whether a model still makes them. Held-out answers are never exported.

    Example: dolly feedback hold-out 12 15 && dolly eval --model dolly@latest --feedback sqlite:///runs/feedback.db
    """
    if _review("held_out", ids, every, db):
        Console().print(f"Check a model against them: dolly eval --model dolly@latest --feedback {db}")


@app.command()
def export(
    out: Path = typer.Argument(..., help="the JSON Lines file to write"),
    db: str = typer.Option(DEFAULT_URL, envvar=FEEDBACK_URL_ENV, help=DB_HELP, show_default=False),
) -> None:
    """Write the approved answers as a Dolly-format corpus (instruction, context, response, category).

    Example: dolly feedback export runs/feedback.jsonl && dolly retrain --new-records runs/feedback.jsonl
    """
    count = FeedbackStore(db).export(out)
    Console().print(f"Wrote {count} approved record(s) to {out}. Retrain on them: dolly retrain --new-records {out}")
