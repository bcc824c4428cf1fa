"""Shared fixtures: where ../shared is, and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOLLY_SHARED", REPO.parent / "shared")).resolve()
CORPUS = SHARED / "data" / "databricks-dolly-15k.jsonl"
PYTHIA_TOKENIZER = SHARED / "tokenizer" / "pythia"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the reference data in ../shared (or set DOLLY_SHARED)")
    return path


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(require_shared(PYTHIA_TOKENIZER))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from contract.models import load_tokenizer

    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    return require_shared(CORPUS)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session: starting one costs seconds. `address="local"`
    never joins a stale `ray start` head; more logical CPUs than cores keep 2-core machines moving."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
