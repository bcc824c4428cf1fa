"""The real databricks-dolly-15k corpus from ../shared, end to end through the pipeline."""

from __future__ import annotations

import pytest

from pipelines.configs import PrepareConfig
from pipelines.prepare import prepare

# From ../shared/README.md.
CATEGORY_COUNTS = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


@pytest.mark.timeout(600)
def test_full_corpus_reads_15011_records_with_the_published_category_counts(tmp_path, corpus_path, tokenizer_path, ray_cluster):
    # A limit above the longest record keeps every record, so the counts cover the whole file.
    result = prepare(
        PrepareConfig(
            source=str(corpus_path), output_dir=tmp_path / "out", tokenizer=tokenizer_path, max_length=8192, test_size=200
        )
    )
    counts, splits = result.manifest["counts"], result.manifest["splits"]
    assert counts == {"read": 15011, "kept": 15011, "rejected": {}, "truncated": 0}
    by_category = {c: splits["train"]["by_category"].get(c, 0) + splits["test"]["by_category"].get(c, 0) for c in CATEGORY_COUNTS}
    assert by_category == CATEGORY_COUNTS
    assert splits["test"]["examples"] == 200
    assert result.manifest["tokenizer"]["special_tokens"] == {
        "### End": 50277,
        "### Instruction:": 50278,
        "### Response:\n": 50279,
    }
