"""Raw records: split source files into records that remember where they came from (the checks
of each one are in contract/records.py).

A record that fails validation is never silently lost: it becomes a reject with its source file,
line and reason, so that `read == kept + rejected` always holds.
"""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")


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
