"""Loss only on the response: labels are -100 through the end of the `### Response:\\n` token."""

from __future__ import annotations

import pytest

from contract import IGNORE_INDEX
from pipelines.tokenize import tokenize_examples

RECORDS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": "summarization"},
    # A response with the text "Response:" in it must not move the mask.
    {"instruction": "Echo.", "context": "", "response": "Response: yes", "category": "open_qa"},
]


@pytest.mark.parametrize("record", RECORDS, ids=["no-context", "context", "look-alike"])
def test_mask_ends_exactly_at_the_response_key_token(tokenizer, record):
    [(input_ids, labels)] = tokenize_examples(tokenizer, [record])
    response_key = input_ids.index(50279)
    assert labels[: response_key + 1] == [IGNORE_INDEX] * (response_key + 1)
    assert labels[response_key + 1 :] == input_ids[response_key + 1 :]
    assert IGNORE_INDEX not in labels[response_key + 1 :]


@pytest.mark.parametrize("record", RECORDS, ids=["no-context", "context", "look-alike"])
def test_the_trained_tokens_are_the_response_and_the_end_marker(tokenizer, record):
    [(input_ids, labels)] = tokenize_examples(tokenizer, [record])
    trained = [t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == record["response"] + "\n\n### End"
    assert trained[-1] == 50277


def test_the_mask_covers_exactly_the_generation_prompt(tokenizer):
    """What serving sends the model is exactly the masked part of what training saw."""
    from contract import render_generation_prompt

    for record in RECORDS:
        [(input_ids, labels)] = tokenize_examples(tokenizer, [record])
        prompt = tokenizer(render_generation_prompt(record["instruction"], record["context"]), add_special_tokens=False)[
            "input_ids"
        ]
        assert input_ids[: len(prompt)] == prompt
        assert labels.count(IGNORE_INDEX) == len(prompt)


def test_an_unvalidated_record_with_a_marker_is_refused(tokenizer):
    record = {"instruction": "Say ### Response:\nhi", "context": "", "response": "hi", "category": "open_qa"}
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_examples(tokenizer, [record])
