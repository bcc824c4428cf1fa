"""The Ray Data corpus pipeline on corpora the tests write: every defect is rejected with its
file, line and reason; nothing is lost; the split is seeded and stable; outputs are verified."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.errors import UserError
from pipelines.configs import PrepareConfig
from pipelines.manifest import verify_manifest
from pipelines.prepare import BadRecordsError, prepare

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(300)]


def good(i: int, category: str = "open_qa", context: str = "") -> dict:
    return {"instruction": f"Question number {i}?", "context": context, "response": f"Answer {i}.", "category": category}


# (line text, expected reason or None); line numbers are positions in this list + 1.
DIRTY_LINES = [
    (json.dumps(good(1)), None),
    ("{this is not json", "not_json"),
    (json.dumps([good(2)]), "not_an_object"),
    (json.dumps({k: v for k, v in good(3).items() if k != "response"}), "missing_field"),
    (json.dumps({**good(4), "context": 5}), "not_a_string"),
    (json.dumps({**good(5), "response": None}), "not_a_string"),
    (json.dumps({**good(6), "instruction": "   "}), "empty_instruction"),
    (json.dumps({**good(7), "response": ""}), "empty_response"),
    (json.dumps({**good(8), "category": "poetry"}), "unknown_category"),
    (json.dumps({**good(9), "response": "Sure.\n\n### End"}), "reserved_marker"),
    (json.dumps({**good(10), "response": "word " * 400}), "too_long"),
    (json.dumps(good(11, "closed_qa", context="Some context.")), None),
]


def write_dirty_corpus(folder: Path) -> dict[tuple[str, int], str]:
    """A folder with a dirty JSONL, a JSON array with one bad element, and a Parquet file.
    Returns {(file name, line): reason} of every record that must be rejected."""
    folder.mkdir()
    lines = [text for text, _ in DIRTY_LINES]
    # A blank line is not a record: it must be neither kept nor rejected.
    (folder / "dirty.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    expected = {}
    for i, (_, reason) in enumerate(DIRTY_LINES):
        if reason:
            expected[("dirty.jsonl", i + 1 + (i >= 5))] = reason
    array = [good(20), {**good(21), "category": 7}, good(22)]
    (folder / "array.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in array) + "\n]\n")
    expected[("array.json", 3)] = "not_a_string"
    rows = [good(30), {**good(31), "instruction": ""}, good(32, "brainstorming")]
    pq.write_table(pa.Table.from_pylist(rows), folder / "table.parquet")
    expected[("table.parquet", 2)] = "empty_instruction"
    return expected


def config(tmp_path: Path, source: Path, tokenizer_path: str, **overrides) -> PrepareConfig:
    settings = {"output_dir": tmp_path / "out", "max_length": 256, "test_size": 2, **overrides}
    return PrepareConfig(source=str(source), tokenizer=tokenizer_path, **settings)


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_preparation_uses_ray_datas_current_arguments_and_logs_no_deprecation(tmp_path, tokenizer_path):
    """A deprecation warning on every run is noise on a newcomer's screen, and tomorrow's error."""
    import logging

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    ray_data = logging.getLogger("ray.data._internal.util")  # where Ray Data warns of deprecated arguments
    ray_data.addHandler(handler)
    try:
        write_dirty_corpus(tmp_path / "corpus")
        prepare(config(tmp_path, tmp_path / "corpus", tokenizer_path, force=True))
    finally:
        ray_data.removeHandler(handler)
    assert not [message for message in logged if "deprecated" in message]


def test_dirty_corpus_gives_exactly_the_expected_rejects_and_counts_reconcile(tmp_path, tokenizer_path):
    expected = write_dirty_corpus(tmp_path / "corpus")
    result = prepare(config(tmp_path, tmp_path / "corpus", tokenizer_path))

    rejects = read_rejects(result.output_dir)
    assert {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects} == expected
    assert all(r["detail"] and r["record"] for r in rejects)
    counts = result.manifest["counts"]
    total_records = len(DIRTY_LINES) + 3 + 3
    assert counts["read"] == total_records
    assert counts["kept"] == total_records - len(expected)
    assert sum(counts["rejected"].values()) == len(expected)
    splits = result.manifest["splits"]
    assert splits["train"]["examples"] + splits["test"]["examples"] == counts["kept"]
    assert splits["test"]["examples"] == 2


def test_reject_details_name_the_field(tmp_path, tokenizer_path):
    write_dirty_corpus(tmp_path / "corpus")
    rejects = {
        r["reason"]: r["detail"] for r in read_rejects(prepare(config(tmp_path, tmp_path / "corpus", tokenizer_path)).output_dir)
    }
    assert "'response' is missing" in rejects["missing_field"]
    assert "'category' is poetry" not in rejects["unknown_category"] and "poetry" in rejects["unknown_category"]
    assert "max_length is 256" in rejects["too_long"]


def test_on_bad_fail_stops_the_run_naming_the_first_bad_record(tmp_path, tokenizer_path):
    write_dirty_corpus(tmp_path / "corpus")
    with pytest.raises(BadRecordsError, match=r"array\.json:3: not_a_string .*field 'category' is int.*--on-bad skip"):
        prepare(config(tmp_path, tmp_path / "corpus", tokenizer_path, on_bad="fail"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_over_length_records_are_policy_not_defects_under_on_bad_fail(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "\n".join(json.dumps(good(i)) for i in range(5)) + "\n" + json.dumps({**good(9), "response": "word " * 400}) + "\n"
    )
    result = prepare(config(tmp_path, corpus, tokenizer_path, on_bad="fail"))
    assert result.manifest["counts"]["rejected"] == {"too_long": 1}


def test_truncate_policy_keeps_over_length_records_cut_to_max_length(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "\n".join(json.dumps(good(i)) for i in range(4)) + "\n" + json.dumps({**good(9), "response": "word " * 400}) + "\n"
    )
    result = prepare(config(tmp_path, corpus, tokenizer_path, length_policy="truncate", test_size=1))
    assert result.manifest["counts"]["truncated"] == 1 and result.manifest["counts"]["rejected"] == {}
    lengths = (
        pq.read_table(result.output_dir / "train").column("input_ids").to_pylist()
        + pq.read_table(result.output_dir / "test").column("input_ids").to_pylist()
    )
    assert max(len(ids) for ids in lengths) == 256


def test_split_is_seeded_and_independent_of_file_order(tmp_path, tokenizer_path):
    records = [good(i, category) for i, category in enumerate(["open_qa", "closed_qa", "brainstorming"] * 10)]
    forward, backward = tmp_path / "f.jsonl", tmp_path / "b.jsonl"
    forward.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    backward.write_text("\n".join(json.dumps(r) for r in reversed(records)) + "\n")

    def split(source, out, seed):
        prepare(PrepareConfig(source=str(source), output_dir=tmp_path / out, tokenizer=tokenizer_path, test_size=5, seed=seed))
        return pq.read_table(tmp_path / out / "test").column("input_ids").to_pylist(), pq.read_table(
            tmp_path / out / "train"
        ).column("input_ids").to_pylist()

    test_f, train_f = split(forward, "f", 42)
    test_b, train_b = split(backward, "b", 42)
    assert len(test_f) == 5 and len(train_f) == 25
    assert test_f == test_b and train_f == train_b  # same examples, same (seeded) order
    test_other, _ = split(forward, "o", 7)
    assert sorted(test_other) != sorted(test_f)


def test_shards_hold_ids_labels_and_provenance(tmp_path, tokenizer_path, tokenizer):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(good(i)) for i in range(6)) + "\n")
    result = prepare(config(tmp_path, corpus, tokenizer_path))
    rows = pq.read_table(result.output_dir / "train").to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert tokenizer.decode(row["input_ids"]).endswith(f"### Response:\nAnswer {row['line'] - 1}.\n\n### End")
        assert len(row["labels"]) == len(row["input_ids"]) == row["n_tokens"]
        assert Path(row["source"]).name == "c.jsonl"
    assert (result.output_dir / "token_lengths.png").stat().st_size > 10_000
    verify_manifest(result.output_dir, tokenizer)


def test_packed_shards_hold_every_training_token_once(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(good(i, context="ctx " * (i * 7))) for i in range(40)) + "\n")
    plain = prepare(config(tmp_path, corpus, tokenizer_path))
    packed = prepare(config(tmp_path, corpus, tokenizer_path, pack=True, output_dir=tmp_path / "packed"))
    plain_rows = pq.read_table(plain.output_dir / "train").to_pylist()
    packed_rows = pq.read_table(packed.output_dir / "train").to_pylist()
    assert len(packed_rows) < len(plain_rows)
    assert sum(r["n_tokens"] for r in packed_rows) == sum(r["n_tokens"] for r in plain_rows)
    for row in packed_rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert [b - a for a, b in zip(starts, starts[1:] + [len(row["position_ids"])])] == row["seq_lens"]
    assert packed.manifest["packing"]["examples"] == len(plain_rows)


def test_second_run_reuses_an_identical_preparation(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(good(i)) for i in range(6)) + "\n")
    first = prepare(config(tmp_path, corpus, tokenizer_path))
    assert not first.reused
    assert prepare(config(tmp_path, corpus, tokenizer_path)).reused
    corpus.write_text(corpus.read_text() + json.dumps(good(99)) + "\n")
    again = prepare(config(tmp_path, corpus, tokenizer_path))
    assert not again.reused and again.manifest["counts"]["read"] == 7


def test_missing_source_says_what_to_pass(tmp_path, tokenizer_path):
    from pipelines.sources import SourceError

    with pytest.raises(SourceError, match="not an existing file or folder"):
        prepare(config(tmp_path, tmp_path / "nope" / "x.jsonl", tokenizer_path))


def test_unreachable_hub_dataset_says_to_pass_a_local_copy(tmp_path, tokenizer_path, monkeypatch):
    from pipelines.sources import SourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="could not fetch Hub dataset 'someone/no-such-dataset'.*local"):
        prepare(PrepareConfig(source="someone/no-such-dataset", output_dir=tmp_path / "o", tokenizer=tokenizer_path))


def test_a_uri_source_reads_through_pyarrow_and_names_records_by_uri(tmp_path, tokenizer_path):
    """s3:// and gs:// go through the same pyarrow filesystem path as file://, which runs offline."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(good(i)) for i in range(5)) + "\n{bad\n")
    result = prepare(config(tmp_path, f"file://{corpus}", tokenizer_path, test_size=1))
    assert result.manifest["source"]["kind"] == "uri"
    assert result.manifest["counts"]["read"] == 6
    [reject] = read_rejects(result.output_dir)
    assert reject["source"] == f"file://{corpus}" and reject["line"] == 6


def test_a_held_out_split_larger_than_the_corpus_is_refused_with_a_size_that_fits(tmp_path, tokenizer_path):
    write_dirty_corpus(tmp_path / "corpus")
    with pytest.raises(UserError, match=r"only (\d+) records were kept\. Hold out fewer, e\.g\. --test-size \d+") as refused:
        prepare(config(tmp_path, tmp_path / "corpus", tokenizer_path, test_size=1000))
    kept = int(re.search(r"only (\d+) records", str(refused.value))[1])
    suggested = int(re.search(r"--test-size (\d+)", str(refused.value))[1])
    assert 1 <= suggested < kept
