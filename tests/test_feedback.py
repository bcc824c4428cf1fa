"""What people send from the chat page, kept and curated: a written answer is checked as the
preparation pipeline checks a corpus record, and the approved ones export as a corpus it keeps."""

from __future__ import annotations

import json

import pytest

from contract.feedback import FeedbackStore
from contract.records import RecordError, Reject
from tests.test_cli import dolly

pytestmark = pytest.mark.timeout(300)
ASKED = {"model": "dolly@2", "instruction": "Name a colour.", "answer": "Bleu"}


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ({"response": "  ", "category": "open_qa"}, Reject.EMPTY_RESPONSE),
        ({"response": "Blue. ### End", "category": "open_qa"}, Reject.RESERVED_MARKER),
        ({"response": "Blue.", "category": "poetry"}, Reject.UNKNOWN_CATEGORY),
    ],
)
def test_a_written_answer_preparation_would_reject_is_refused_for_the_same_reason(db, written, reason):
    with pytest.raises(RecordError) as refused:
        FeedbackStore(db).add(**ASKED, **written)
    assert refused.value.reason is reason
    assert FeedbackStore(db).rows() == []


def test_curation_approves_and_rejects_and_exports_a_corpus_that_preparation_keeps(db, tmp_path, tokenizer_path):
    store = FeedbackStore(db)
    store.add(**ASKED, rating="up")
    ids = [store.add(**ASKED, rating="down", response=f"Blue, {i}.", category="open_qa", context=f"c{i}") for i in range(4)]

    listed = dolly("feedback", "list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    assert "4 pending. In all: 1 up, 4 down; written answers 4 pending, 0 approved, 0 rejected, 0 held_out" in listed.stdout

    assert dolly("feedback", "approve", str(ids[0]), str(ids[1]), str(ids[2]), "--db", db).returncode == 0
    unknown = dolly("feedback", "reject", str(ids[0]), "--db", db)  # approved already: not pending
    assert unknown.returncode == 1 and f"not pending written answers: [{ids[0]}]" in unknown.stderr
    assert dolly("feedback", "reject", "--all", "--db", db).returncode == 0
    assert store.counts() == {"up": 1, "down": 4, "pending": 0, "approved": 3, "rejected": 1, "held_out": 0}

    corpus = tmp_path / "feedback.jsonl"
    exported = dolly("feedback", "export", str(corpus), "--db", db)
    assert exported.returncode == 0 and "Wrote 3 approved record(s)" in exported.stdout
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert records[0] == {"instruction": "Name a colour.", "context": "c0", "response": "Blue, 0.", "category": "open_qa"}

    prepared = dolly(
        "data", "prepare", "--source", str(corpus), "--tokenizer", tokenizer_path, "--out", str(tmp_path / "data"), "test_size=1"
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "read 3 = kept 3 + rejected 0 (reconciled)" in prepared.stdout


def test_corrections_of_the_models_answers_are_held_out_for_evaluation_and_never_trained_on(db, tmp_path):
    store = FeedbackStore(db)
    correction = store.add(**ASKED, response="Blue.", category="open_qa")
    written = store.add(
        model="dolly@2", instruction="Write a haiku about rain.", response="Rain taps.", category="creative_writing"
    )

    alone = dolly("feedback", "hold-out", str(written), "--db", db)
    assert alone.returncode == 1 and f"written answers [{written}] correct no answer of the model" in alone.stderr
    held = dolly("feedback", "hold-out", "--all", "--db", db)  # every pending correction, not the answer written alone
    assert held.returncode == 0, held.stderr
    assert f"Held out 1: {correction}" in held.stdout and f"dolly eval --model dolly@latest --feedback {db}" in held.stdout
    assert [row["id"] for row in store.rows("held_out")] == [correction]

    assert dolly("feedback", "approve", "--all", "--db", db).returncode == 0  # approves only what is still pending
    assert store.counts() == {"up": 0, "down": 0, "pending": 0, "approved": 1, "rejected": 0, "held_out": 1}
    corpus = tmp_path / "feedback.jsonl"
    assert store.export(corpus) == 1
    assert "Blue." not in corpus.read_text()


@pytest.fixture
def postgres(tmp_path) -> str:
    """A real Postgres server (pgserver's own binaries) for this test, as a SQLAlchemy URL."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver is a dev dependency: pip install -e '.[dev]'")
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


def test_on_postgres_concurrent_writers_lose_nothing_and_curation_works_alike(postgres, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def submit(i: int) -> int:  # each writer with a store of its own, as each ingress replica has
        written = {"response": f"Blue, {i}.", "category": "open_qa"} if i % 2 else {}
        return FeedbackStore(postgres).add(**ASKED, rating="down", user=f"user-{i % 5}", **written)

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(80)))
    store = FeedbackStore(postgres)
    assert len(set(ids)) == 80 and sorted(r["id"] for r in store.rows()) == sorted(ids)
    assert store.counts() == {"up": 0, "down": 80, "pending": 40, "approved": 0, "rejected": 0, "held_out": 0}
    assert all(r["created_at"].tzinfo is not None for r in store.rows())

    listed = dolly("feedback", "list", "--db", postgres)
    assert listed.returncode == 0 and "40 pending." in listed.stdout, listed.stderr
    pending = [r["id"] for r in store.rows("pending")]
    store.review("held_out", pending[:10])
    store.review("approved")
    assert store.counts() == {"up": 0, "down": 80, "pending": 0, "approved": 30, "rejected": 0, "held_out": 10}
    assert store.export(tmp_path / "approved.jsonl") == 30


@pytest.mark.parametrize("database", ["db", "postgres"])
def test_a_request_sent_again_with_its_idempotency_key_is_stored_once(database, request):
    """A retry after a lost answer (the client's, or a proxy's) comes with the first request's
    key, even while the first is still being stored: one item, one id for both."""
    from concurrent.futures import ThreadPoolExecutor

    from contract.feedback import KeyReused

    url = request.getfixturevalue(database)
    rated = {**ASKED, "rating": "down", "response": "Blue.", "category": "open_qa"}
    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(lambda _: FeedbackStore(url).add_once("key-1", **rated), range(8)))
    store = FeedbackStore(url)
    (stored,) = store.rows()
    assert sorted(sent) == [(stored["id"], False)] * 7 + [(stored["id"], True)]

    with pytest.raises(KeyReused, match="key-1"):
        store.add_once("key-1", **{**rated, "rating": "up"})
    assert store.add_once("key-2", **rated)[1] and len(store.rows()) == 2, "a new key is a new item"
