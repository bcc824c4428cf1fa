"""The manifest beside the shards: what they were built from, and a check that training reads
exactly that.

Shards tokenized with one tokenizer and read with another give a model that learns garbage, or a
held-out loss that means nothing, without any error; so training and evaluation call
`verify_manifest` first and refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from contract import prompt as contract_prompt
from contract.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "test")


class ManifestError(UserError):
    pass


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: vocabulary, merges, added tokens, normalization, and the
    pad token. Call-time truncation and padding state is left out."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["pad_token"] = tokenizer.pad_token
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def contract_fingerprint() -> str:
    """sha256 of the prompt template's strings: shards rendered with another template are stale."""
    parts = [contract_prompt.render_training_example("I", "R", "C"), *contract_prompt.SPECIAL_TOKENS]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def file_sha256(path, filesystem: pafs.FileSystem | None = None) -> str:
    """sha256 of a file on a pyarrow filesystem (local by default: s3:// and gs:// work alike)."""
    digest = hashlib.sha256()
    with (filesystem or pafs.LocalFileSystem()).open_input_stream(str(path)) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_hashes(data_dir: Path) -> dict[str, str]:
    """{path relative to data_dir: sha256} of every Parquet shard under the split folders."""
    return {
        str(path.relative_to(data_dir)): file_sha256(path)
        for split in SPLITS
        for path in sorted((data_dir / split).glob("*.parquet"))
    }


def write_manifest(data_dir: Path, manifest: dict) -> Path:
    shards = {
        name: {"sha256": digest, "rows": pq.ParquetFile(data_dir / name).metadata.num_rows}
        for name, digest in shard_hashes(data_dir).items()
    }
    path = data_dir / MANIFEST_NAME
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest, "shards": shards}, indent=2) + "\n")
    return path


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"{path} not found: prepare the data first with `dolly data prepare --out {data_dir}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format {manifest.get('format_version')}, expected {FORMAT_VERSION}: re-run `dolly data prepare`"
        )
    return manifest


@dataclass(frozen=True)
class VerifiedData:
    """Shards whose hashes matched their manifest: what one stage hands the next (preparation to
    scoring, scoring to training), so the shards are hashed once and not at every step."""

    dir: Path
    manifest: dict


def verify_manifest(data_dir: Path, tokenizer=None, model: str | None = None) -> dict:
    """Check the shards against their manifest and, given one, the tokenizer that will read them:
    training's, or with `model` named, the tokenizer of a model evaluated on them.

    Returns the manifest. Raises ManifestError naming what differs and how to fix it.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    redo = f"re-run `dolly data prepare --out {data_dir}`"
    if manifest["contract"]["fingerprint"] != contract_fingerprint():
        raise ManifestError(f"{data_dir} was rendered with a different prompt template: {redo}")
    check_tokenizer(VerifiedData(data_dir, manifest), tokenizer, model)
    actual_shards = shard_hashes(data_dir)
    recorded = manifest["shards"]
    for name in sorted(set(recorded) | set(actual_shards)):
        if name not in actual_shards:
            raise ManifestError(f"shard {data_dir / name} is listed in the manifest but missing: {redo}")
        if name not in recorded:
            raise ManifestError(f"shard {data_dir / name} is not in the manifest (a leftover from another run?): {redo}")
        if actual_shards[name] != recorded[name]["sha256"]:
            raise ManifestError(f"shard {data_dir / name} changed since it was written (sha256 differs): {redo}")
    return manifest


def verified(data: Path | VerifiedData, tokenizer=None, model: str | None = None) -> VerifiedData:
    """`data` checked for `tokenizer` (see verify_manifest); its shards are hashed only when no
    stage before has verified them."""
    if isinstance(data, VerifiedData):
        check_tokenizer(data, tokenizer, model)
        return data
    return VerifiedData(Path(data), verify_manifest(data, tokenizer, model))


def check_tokenizer(data: VerifiedData, tokenizer, model: str | None = None) -> None:
    """Refuse a tokenizer other than the one the shards were made with (None: no check)."""
    data_dir, manifest = data.dir, data.manifest
    redo = f"re-run `dolly data prepare --out {data_dir}`"
    if tokenizer is not None:
        expected = manifest["tokenizer"]
        actual = tokenizer_fingerprint(tokenizer)
        if actual != expected["fingerprint"]:
            made = f"{data_dir} was tokenized with {expected['name_or_path']!r}"
            if model is None:
                raise ManifestError(
                    f"{made} (fingerprint {expected['fingerprint'][:12]}), but this tokenizer ({tokenizer.name_or_path!r}) has "
                    f"fingerprint {actual[:12]}: train with the same tokenizer, or {redo} --tokenizer {tokenizer.name_or_path}"
                )
            # Evaluation's fix is held-out data of its own: the folder may be what another model trains on.
            raise ManifestError(
                f"{made} ({expected['vocab_size']} ids, fingerprint {expected['fingerprint'][:12]}), but {model} uses tokenizer "
                f"{tokenizer.name_or_path!r} ({len(tokenizer)} ids, fingerprint {actual[:12]}): prepare held-out data with the "
                f"model's tokenizer, e.g. dolly data prepare --out {data_dir}-eval --tokenizer {tokenizer.name_or_path}"
            )
