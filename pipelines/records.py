"""Raw records: split source files into records that remember where they came from, and
validate each one.

A record that fails validation is never silently lost: it becomes a reject with its source file,
line and reason, so that `read == kept + rejected` always holds.
"""

from __future__ import annotations

import io
import json
from enum import Enum

import pyarrow.parquet as pq

from contract import RESERVED_MARKERS

FIELDS = ("instruction", "context", "response", "category")

DOLLY_CATEGORIES = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)

SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")


class Reject(str, Enum):  # noqa: UP042 (a behaviour-free refactor: StrEnum changes what str() of a member returns)
    """Why a record was rejected. TOO_LONG is the length policy at work, not a defect."""

    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    NOT_A_STRING = "not_a_string"
    EMPTY_INSTRUCTION = "empty_instruction"
    EMPTY_RESPONSE = "empty_response"
    UNKNOWN_CATEGORY = "unknown_category"
    RESERVED_MARKER = "reserved_marker"
    TOO_LONG = "too_long"

    @property
    def is_defect(self) -> bool:
        return self is not Reject.TOO_LONG


class RecordError(ValueError):
    def __init__(self, reason: Reject, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def split_records(path: str, data: bytes) -> list[dict]:
    """One row per record in a source file: {source, line, raw}.

    `line` is the 1-based line where the record starts (the row number for Parquet). `raw` is the
    record's JSON text; for JSON Lines, the line exactly as written. Blank lines are not records.
    """
    if path.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        return [
            {"source": path, "line": i + 1, "raw": json.dumps(row, ensure_ascii=False, default=str)}
            for i, row in enumerate(table.to_pylist())
        ]
    text = data.decode("utf-8", errors="replace")
    if path.endswith(".json") and text.lstrip().startswith("["):
        return _split_json_array(path, text)
    return [{"source": path, "line": i + 1, "raw": line} for i, line in enumerate(text.splitlines()) if line.strip()]


def _split_json_array(path: str, text: str) -> list[dict]:
    """Decode a JSON array element by element, so each record keeps its own line number.

    A syntax error leaves the rest of the file unreadable; it becomes a single not-JSON record at
    the line where the error is, rather than disappearing.
    """
    decoder = json.JSONDecoder()
    rows: list[dict] = []
    pos = text.index("[") + 1
    while True:
        pos = _skip_space_and_commas(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return rows
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            rows.append({"source": path, "line": line, "raw": text[pos:].rstrip().rstrip("]")})
            return rows
        rows.append({"source": path, "line": line, "raw": json.dumps(value, ensure_ascii=False)})
        pos = end


def _skip_space_and_commas(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
        pos += 1
    return pos


def validate_record(raw: str, categories: frozenset[str] | None) -> dict[str, str]:
    """The record's four fields, or a RecordError naming the first thing wrong with it."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecordError(Reject.NOT_JSON, f"not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise RecordError(Reject.NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    for field in FIELDS:
        if field not in record:
            raise RecordError(Reject.MISSING_FIELD, f"field '{field}' is missing")
        if not isinstance(record[field], str):
            kind = "null" if record[field] is None else type(record[field]).__name__
            raise RecordError(Reject.NOT_A_STRING, f"field '{field}' is {kind}, not a string")
    if not record["instruction"].strip():
        raise RecordError(Reject.EMPTY_INSTRUCTION, "field 'instruction' is empty")
    if not record["response"].strip():
        raise RecordError(Reject.EMPTY_RESPONSE, "field 'response' is empty")
    if categories is not None and record["category"] not in categories:
        raise RecordError(
            Reject.UNKNOWN_CATEGORY,
            f"category '{record['category']}' is not one of {', '.join(sorted(categories))} (set categories=null to accept any)",
        )
    for field in ("instruction", "context", "response"):
        for marker in RESERVED_MARKERS:
            if marker in record[field]:
                raise RecordError(
                    Reject.RESERVED_MARKER,
                    f"field '{field}' contains the prompt marker '{marker}', which would corrupt the "
                    "loss mask and stop generation early",
                )
    return {field: record[field] for field in FIELDS}
