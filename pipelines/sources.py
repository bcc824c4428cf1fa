"""Where a corpus comes from: a local file or folder, a pyarrow/fsspec URI, or a Hub dataset id.

All three end as a list of JSONL / JSON / Parquet files on a pyarrow filesystem, plus a
fingerprint of their content, so that the rest of the pipeline reads them the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from contract.errors import UserError
from pipelines.manifest import file_sha256
from pipelines.records import SOURCE_SUFFIXES

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
# Our own instruction records, one handful per Dolly category: a corpus that is always there.
BUILTIN_SAMPLE = Path(__file__).with_name("sample_data") / "instructions.jsonl"
# Its 40 records held out as a test split of 8, so every category still has some to learn from.
SAMPLE_TEST_SIZE = 8
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class SourceError(UserError):
    pass


@dataclass
class Source:
    spec: str  # what the user passed
    kind: str  # "local", "uri" or "hub"
    filesystem: pafs.FileSystem
    files: list[str]
    file_hashes: dict[str, str] = field(default_factory=dict)

    def display_name(self, path: str) -> str:
        """A file's name as the user would write it: with its URI scheme, if it came from one."""
        return f"{self.spec.split('://', 1)[0]}://{path}" if self.kind == "uri" else path

    @property
    def fingerprint(self) -> str:
        """sha256 over the files' content hashes, in path order."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(self.file_hashes[path].encode())
        return digest.hexdigest()


def resolve_source(spec: str, hub_cache_dir: str | None = None) -> Source:
    """Find the corpus files behind `spec` and hash them. Raises SourceError saying what to pass instead."""
    if "://" in spec:
        filesystem, path = pafs.FileSystem.from_uri(spec)
        kind = "uri"
    elif os.path.exists(spec):
        filesystem, path, kind = pafs.LocalFileSystem(), os.path.abspath(spec), "local"
    elif _HUB_ID.match(spec):
        filesystem, path, kind = pafs.LocalFileSystem(), _download_from_hub(spec, hub_cache_dir), "hub"
    else:
        raise SourceError(
            f"source {spec!r} is not an existing file or folder, a URI (s3://, gs://, file://) or a Hub "
            "dataset id (owner/name); e.g. --source ../shared/data/databricks-dolly-15k.jsonl"
        )
    files = _list_corpus_files(filesystem, path, spec)
    source = Source(spec=spec, kind=kind, filesystem=filesystem, files=files)
    source.file_hashes = {f: file_sha256(f, filesystem) for f in files}
    return source


def _list_corpus_files(filesystem: pafs.FileSystem, path: str, spec: str) -> list[str]:
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source {spec!r} does not exist")
    if info.type == pafs.FileType.File:
        if not path.endswith(SOURCE_SUFFIXES):
            raise SourceError(f"source {spec!r} is not a {'/'.join(SOURCE_SUFFIXES)} file")
        return [path]
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File and f.path.endswith(SOURCE_SUFFIXES) and "/." not in f.path[len(path) :]
    )
    if not files:
        raise SourceError(f"folder {spec!r} holds no {', '.join(SOURCE_SUFFIXES)} files")
    return files


def _download_from_hub(repo_id: str, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id, repo_type="dataset", cache_dir=cache_dir, allow_patterns=[f"*{s}" for s in SOURCE_SUFFIXES]
        )
    except Exception as e:  # offline, unknown id, gated: all mean "use a local copy"
        raise SourceError(
            f"could not fetch Hub dataset {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Without the Hub, pass a local "
            "copy, e.g. --source ../shared/data/databricks-dolly-15k.jsonl"
        ) from None


def choose_source(explicit: str | None, hub_timeout_s: float = 3.0) -> tuple[str, str]:
    """(source, why it was chosen): `explicit` or $DOLLY_DATA, else Dolly's corpus on the Hub when
    the Hub answers, else the built-in sample, so that a first run works offline."""
    if explicit or os.environ.get("DOLLY_DATA"):
        return (explicit, "given with --data") if explicit else (os.environ["DOLLY_DATA"], "from $DOLLY_DATA")
    if _hub_reachable(hub_timeout_s):
        return DOLLY_HUB_ID, "from the Hugging Face Hub"
    return str(BUILTIN_SAMPLE), (
        f"the built-in sample of {sum(1 for _ in BUILTIN_SAMPLE.open())} records: the Hub is "
        "unreachable and neither --data nor $DOLLY_DATA is set"
    )


def _hub_reachable(timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        return httpx.head(f"{endpoint}/api/datasets/{DOLLY_HUB_ID}", timeout=timeout_s, follow_redirects=True).status_code < 400
    except httpx.HTTPError:
        return False
