"""Turn validated records into token ids and labels, with loss only on the response.

Labels are -100 up to and including the `### Response:\\n` token, as Dolly's
DataCollatorForCompletionOnlyLM sets them; here they are computed once, at preparation time,
so every training step reads them instead of searching for the token again.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa

from contract import IGNORE_INDEX, RESPONSE_KEY_NL, render_training_example
from contract.models import load_tokenizer
from contract.records import RecordError, Reject, validate_record


def tokenize_examples(tokenizer, records: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each training example, tokenized in one batch call.

    Records must be validated first: validation rejects any field holding a prompt marker, so the
    one `### Response:\n` token in an example is where the prompt ends and the mask stops.
    """
    if not records:
        return []
    examples = [render_training_example(r["instruction"], r["response"], r["context"]) for r in records]
    # verbose=False: long examples are expected here; the length policy deals with them.
    example_ids = tokenizer(examples, add_special_tokens=False, verbose=False)["input_ids"]
    response_key_id = tokenizer.convert_tokens_to_ids(RESPONSE_KEY_NL)
    result = []
    for ids in example_ids:
        if ids.count(response_key_id) != 1:
            raise ValueError(
                f"an example must hold exactly one {RESPONSE_KEY_NL!r} token, found {ids.count(response_key_id)}: "
                "validate records first, and load the tokenizer through contract.models.load_tokenizer"
            )
        prompt_length = ids.index(response_key_id) + 1
        result.append((ids, [IGNORE_INDEX] * prompt_length + ids[prompt_length:]))
    return result


def split_key(seed: int, record: dict[str, str]) -> str:
    """A seeded hash of the record's content: ordering by it gives a train/test split that does not
    depend on file order or partitioning (the same split from the Hub file and a reordered copy)."""
    text = "\x1f".join([str(seed), record["instruction"], record["context"], record["response"], record["category"]])
    return hashlib.sha256(text.encode()).hexdigest()


RESULT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line", pa.int64()),
        ("raw", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("category", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_prompt_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("split_key", pa.string()),
    ]
)


def process_batch(
    batch: dict[str, np.ndarray],
    *,
    tokenizer_name: str,
    categories: list[str] | None,
    max_length: int,
    length_policy: Literal["drop", "truncate"],
    seed: int,
) -> pa.Table:
    """Validate and tokenize a batch of raw records (a Ray Data `map_batches` function).

    Every input row comes out, either kept (reason "") or rejected with a reason and detail.
    """
    tokenizer = load_tokenizer(tokenizer_name)
    allowed = frozenset(categories) if categories is not None else None
    rows, valid = [], []
    for source, line, raw in zip(batch["source"], batch["line"], batch["raw"]):
        row = {
            "source": source,
            "line": int(line),
            "raw": raw,
            "reason": "",
            "detail": "",
            "category": "",
            "input_ids": [],
            "labels": [],
            "n_tokens": 0,
            "n_prompt_tokens": 0,
            "truncated": False,
            "split_key": "",
        }
        rows.append(row)
        try:
            valid.append((row, validate_record(raw, allowed)))
        except RecordError as e:
            row.update(reason=e.reason.value, detail=e.detail)
    for (row, record), (input_ids, labels) in zip(valid, tokenize_examples(tokenizer, [r for _, r in valid])):
        n_prompt = labels.count(IGNORE_INDEX)
        row.update(
            category=record["category"], n_tokens=len(input_ids), n_prompt_tokens=n_prompt, split_key=split_key(seed, record)
        )
        if len(input_ids) > max_length:
            if length_policy == "drop":
                row.update(reason=Reject.TOO_LONG.value, detail=f"{len(input_ids)} tokens; max_length is {max_length}")
                continue
            if n_prompt >= max_length:
                row.update(
                    reason=Reject.TOO_LONG.value,
                    detail=f"the prompt alone is {n_prompt} tokens; max_length is {max_length}, so no response would remain",
                )
                continue
            input_ids, labels, row["truncated"] = input_ids[:max_length], labels[:max_length], True
        row.update(input_ids=input_ids, labels=labels)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
