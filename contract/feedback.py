"""What people who chat can teach the model: their ratings of its answers, and the better answers
they write, kept in a real database until a curator approves or rejects them (`dolly feedback`).

SQLite by default on one machine (runs/feedback.db, in WAL mode so that several ingress
replicas write at once); any SQLAlchemy URL (Postgres on a cluster) by setting. A written answer
is checked as the preparation pipeline checks every corpus record (contract/records.py), so an
approved record exports as a Dolly-format line that preparation keeps; a correction of the model's
answer can instead be held out, to check later models against the mistake (`dolly eval
--feedback`), and is then never trained on. Prompts and answers are stored here only, never in logs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    exc,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url

from contract import runs
from contract.records import DOLLY_CATEGORIES, FIELDS, validate_record

DEFAULT_URL = f"sqlite:///{runs.FEEDBACK_DB}"
STATUSES = ("pending", "approved", "rejected", "held_out")  # of a written answer; a bare rating has none
REVIEWS = STATUSES[1:]

_metadata = MetaData()
FEEDBACK = Table(
    "feedback",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model", String(200), nullable=False),  # the version that answered, as dolly@3
    Column("answer_id", String(100)),  # the answer's `id` in the API
    Column("rating", String(4)),  # up, down, or none
    Column("instruction", Text, nullable=False),
    Column("context", Text, nullable=False),
    Column("answer", Text, nullable=False),  # what the model said
    Column("response", Text),  # the better answer a person wrote
    Column("category", String(40)),
    Column("user", String(200)),  # the page's user, when a login is configured
    Column("status", String(10)),
)
# The Idempotency-Key of each request that stored an item (add_once), so that the same request
# sent again (a client's or a proxy's retry after a lost answer) stores nothing twice. A table of
# its own rather than a column: create_all adds it to a database made before it.
REQUEST_KEYS = Table(
    "feedback_request_keys",
    _metadata,
    Column("key", String(200), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # of the item, to refuse a key reused for another
    Column("feedback_id", Integer, ForeignKey("feedback.id"), nullable=False),
)


class KeyReused(ValueError):
    """An Idempotency-Key sent again with another item than the first time."""


def _sqlite_file(parsed: URL) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database)
    return None


def absolute_url(url: str) -> str:
    """`url` with a relative SQLite path made absolute against this process's working directory:
    resolve where the setting is read, since Ray workers have a working directory of their own."""
    parsed = make_url(url)
    if (path := _sqlite_file(parsed)) is not None:
        parsed = parsed.set(database=str(path.expanduser().resolve()))
    return parsed.render_as_string(hide_password=False)


def shown(url: str) -> str:
    """`url` fit for a screen or a log: its password (a Secret's, on KubeRay) starred out."""
    return make_url(url).render_as_string(hide_password=True)


def engine_for(url: str) -> Engine:
    """An engine on `url`, its table created (and a SQLite file's folder)."""
    parsed = make_url(absolute_url(url))
    if (path := _sqlite_file(parsed)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _concurrent_writers(connection, _record):
            # WAL: readers never block the writer; busy_timeout: a writer waits its turn instead of failing.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")

    for table in _metadata.sorted_tables:
        try:
            table.create(engine, checkfirst=True)
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError):
            # Replicas starting together race to create it (Postgres: a duplicate type or
            # relation; SQLite: "table already exists"): the loser finds it there. A real fault is raised.
            if not inspect(engine).has_table(table.name):
                raise
    return engine


class FeedbackStore:
    def __init__(self, url: str = DEFAULT_URL):
        self._engine = engine_for(url)

    def add(self, **item) -> int:
        """Store one rating and/or written answer (the fields of `_row`); returns its id. A
        written answer that the preparation pipeline would reject raises its RecordError, reason
        and field named."""
        row = _row(**item)
        with self._engine.begin() as connection:
            return connection.execute(FEEDBACK.insert().values(**row)).inserted_primary_key[0]

    def add_once(self, request_key: str, **item) -> tuple[int, bool]:
        """`add`, for a request that may come again: the id, and whether this call stored it.
        The same key with another item raises KeyReused."""
        row = _row(**item)
        fingerprint = hashlib.sha256(json.dumps({**row, "created_at": None}, sort_keys=True).encode()).hexdigest()
        try:
            with self._engine.begin() as connection:
                if (known := self._known(connection, request_key, fingerprint)) is not None:
                    return known, False
                stored = connection.execute(FEEDBACK.insert().values(**row)).inserted_primary_key[0]
                connection.execute(REQUEST_KEYS.insert().values(key=request_key, fingerprint=fingerprint, feedback_id=stored))
                return stored, True
        except exc.IntegrityError:  # the same request, stored meanwhile by another writer
            with self._engine.connect() as connection:
                if (known := self._known(connection, request_key, fingerprint)) is None:
                    raise
                return known, False

    @staticmethod
    def _known(connection, request_key: str, fingerprint: str) -> int | None:
        found = connection.execute(select(REQUEST_KEYS).where(REQUEST_KEYS.c.key == request_key)).first()
        if found is None:
            return None
        if found.fingerprint != fingerprint:
            raise KeyReused(f"Idempotency-Key {request_key!r} stored another item before: send a new key with a new item")
        return found.feedback_id

    def rows(self, status: str | None = None) -> list[dict]:
        """Every item, oldest first; with `status`, only the written answers in it."""
        query = select(FEEDBACK).order_by(FEEDBACK.c.id)
        if status is not None:
            query = query.where(FEEDBACK.c.status == status)
        with self._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def review(self, status: str, ids: list[int] | None = None) -> list[int]:
        """Approve, reject or hold out pending written answers: those of `ids`, or every pending
        one (that corrects an answer of the model, to hold out). Returns the ids changed; an id
        that is not a pending written answer, or holds out no mistake, is refused, named."""
        if status not in REVIEWS:
            raise ValueError(f"a review sets one of {', '.join(REVIEWS)}, not {status!r}")
        pending = {row["id"]: row for row in self.rows("pending")}
        chosen = sorted(pending) if ids is None else sorted(set(ids))
        unknown = [i for i in chosen if i not in pending]
        if unknown:
            raise KeyError(f"not pending written answers: {unknown}; `dolly feedback list` shows the pending ones")
        if status == "held_out":
            correcting = [i for i in chosen if pending[i]["answer"].strip()]
            if ids is not None and (alone := sorted(set(chosen) - set(correcting))):
                raise KeyError(
                    f"written answers {alone} correct no answer of the model, so there is no mistake to check "
                    "a model against: approve them for training instead"
                )
            chosen = correcting
        with self._engine.begin() as connection:
            connection.execute(update(FEEDBACK).where(FEEDBACK.c.id.in_(chosen)).values(status=status))
        return chosen

    def export(self, path: Path) -> int:
        """The approved written answers as Dolly-format JSON Lines, for `dolly retrain --new-records`."""
        approved = self.rows("approved")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            for row in approved:
                out.write(json.dumps({field: row[field] for field in FIELDS}, ensure_ascii=False) + "\n")
        return len(approved)

    def counts(self) -> dict[str, int]:
        """Ratings up and down, and written answers by status."""
        with self._engine.connect() as connection:
            ratings = dict(connection.execute(select(FEEDBACK.c.rating, func.count()).group_by(FEEDBACK.c.rating)).all())
            statuses = dict(connection.execute(select(FEEDBACK.c.status, func.count()).group_by(FEEDBACK.c.status)).all())
        return {"up": ratings.get("up", 0), "down": ratings.get("down", 0)} | {s: statuses.get(s, 0) for s in STATUSES}


def _row(
    *,
    model: str,
    instruction: str,
    context: str = "",
    answer: str = "",
    rating: str | None = None,
    response: str | None = None,
    category: str | None = None,
    user: str | None = None,
    answer_id: str | None = None,
) -> dict:
    if rating not in (None, "up", "down"):
        raise ValueError(f"rating must be 'up' or 'down', not {rating!r}")
    # A rating's instruction is checked as a record's is; it may become one in a held-out set.
    written = {"response": "-", "category": "open_qa"} if response is None else {"response": response, "category": category}
    record = {"instruction": instruction, "context": context, **written}
    validate_record(json.dumps(record), frozenset(DOLLY_CATEGORIES))
    return dict(
        created_at=datetime.datetime.now(datetime.UTC),
        model=model,
        answer_id=answer_id,
        rating=rating,
        instruction=instruction,
        context=context,
        answer=answer,
        response=response,
        category=category,
        user=user,
        status="pending" if response is not None else None,
    )
