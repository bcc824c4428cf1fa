"""A Dolly record, {instruction, context, response, category}, and what makes one valid: shared
by the preparation pipeline (every corpus) and the feedback the chat page collects, so that both
reject the same records for the same reasons."""

from __future__ import annotations

import json
from enum import Enum

from contract.prompt import RESERVED_MARKERS

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
    def __init__(self, reason: Reject, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field  # field: the one at fault, if one is


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
            raise RecordError(Reject.MISSING_FIELD, f"field '{field}' is missing", field)
        if not isinstance(record[field], str):
            kind = "null" if record[field] is None else type(record[field]).__name__
            raise RecordError(Reject.NOT_A_STRING, f"field '{field}' is {kind}, not a string", field)
    if not record["instruction"].strip():
        raise RecordError(Reject.EMPTY_INSTRUCTION, "field 'instruction' is empty", "instruction")
    if not record["response"].strip():
        raise RecordError(Reject.EMPTY_RESPONSE, "field 'response' is empty", "response")
    if categories is not None and record["category"] not in categories:
        raise RecordError(
            Reject.UNKNOWN_CATEGORY,
            f"category '{record['category']}' is not one of {', '.join(sorted(categories))} (set categories=null to accept any)",
            "category",
        )
    for field in ("instruction", "context", "response"):
        for marker in RESERVED_MARKERS:
            if marker in record[field]:
                raise RecordError(
                    Reject.RESERVED_MARKER,
                    f"field '{field}' contains the prompt marker '{marker}', which would corrupt the "
                    "loss mask and stop generation early",
                    field,
                )
    return {field: record[field] for field in FIELDS}
