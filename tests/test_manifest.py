"""Training must never read shards that differ from what their manifest describes."""

from __future__ import annotations

import json

import pytest

from contract.models import load_tokenizer
from pipelines.configs import PrepareConfig
from pipelines.manifest import ManifestError, verify_manifest
from pipelines.prepare import prepare

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_path, ray_cluster):
    folder = tmp_path_factory.mktemp("manifest")
    corpus = folder / "c.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"instruction": f"Q{i}?", "context": "", "response": f"A{i}.", "category": "open_qa"}) for i in range(8)
        )
        + "\n"
    )
    return prepare(PrepareConfig(source=str(corpus), output_dir=folder / "out", tokenizer=tokenizer_path, test_size=2)).output_dir


def copy_of(prepared, tmp_path):
    import shutil

    return shutil.copytree(prepared, tmp_path / "data")


def test_verifies_with_the_tokenizer_it_was_made_with(prepared, tokenizer):
    manifest = verify_manifest(prepared, tokenizer)
    assert manifest["counts"] == {"read": 8, "kept": 8, "rejected": {}, "truncated": 0}
    assert manifest["tokenizer"]["special_tokens"] == {"### End": 50277, "### Instruction:": 50278, "### Response:\n": 50279}


def test_a_changed_tokenizer_is_refused_with_how_to_fix_it(prepared, tokenizer_path):
    changed = load_tokenizer.__wrapped__(tokenizer_path)  # a fresh copy, not the cached one
    changed.add_tokens(["<new-token>"])
    with pytest.raises(ManifestError, match=r"tokenized with .*pythia.* but this tokenizer .* re-run `dolly data prepare"):
        verify_manifest(prepared, changed)


def test_a_changed_shard_is_refused(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    shard = next((data / "train").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"tampered")
    with pytest.raises(ManifestError, match=r"changed since it was written"):
        verify_manifest(data)


def test_a_stray_or_missing_shard_is_refused(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    shard = next((data / "train").glob("*.parquet"))
    (data / "train" / "stray.parquet").write_bytes(shard.read_bytes())
    with pytest.raises(ManifestError, match=r"stray\.parquet is not in the manifest"):
        verify_manifest(data)
    (data / "train" / "stray.parquet").unlink()
    shard.unlink()
    with pytest.raises(ManifestError, match=r"listed in the manifest but missing"):
        verify_manifest(data)


def test_a_folder_without_manifest_says_to_prepare_first(tmp_path):
    with pytest.raises(ManifestError, match="prepare the data first"):
        verify_manifest(tmp_path)
