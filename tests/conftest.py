"""Shared fixtures: where ../shared is, one local Ray cluster per test session, a tiny exported
model, and a real browser for the chat page."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.connect import free_port  # noqa: F401  (for the servers the tests start)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOLLY_SHARED", REPO.parent / "shared")).resolve()
CORPUS = SHARED / "data" / "databricks-dolly-15k.jsonl"
PYTHIA_TOKENIZER = SHARED / "tokenizer" / "pythia"
# DeepSpeed JIT-compiles a comm op on first use (~30 s): one stable folder (the Makefile's) builds
# it once. Set before any Ray cluster starts, so that its workers inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


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


def export_tiny_model(folder: Path, tokenizer_path: str, seed: int = 0) -> Path:
    """A random pythia-14m-shaped model exported the way training exports one: safetensors, the
    tokenizer with Dolly's tokens, and a generation config whose eos is `### End`. Its output
    layer is scaled up so that each next token clearly wins: greedy decoding then gives the same
    text alone or batched, whatever order float sums take."""
    import torch

    from contract.models import load_model, load_tokenizer
    from pipelines.export import generation_config

    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    model = load_model("pythia-14m-random", tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_path) -> Path:
    """An exported tiny model folder (see export_tiny_model), made once per session."""
    return export_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer_path)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, corpus_path, tokenizer_path, ray_cluster) -> Path:
    """Training shards small enough to overfit in seconds: the first 6 short records of the real
    corpus (4 to train on, 2 held out), at most 128 tokens each."""
    import json

    records = (json.loads(line) for line in corpus_path.open())
    short = [r for r in records if len(r["instruction"]) + len(r["context"]) + len(r["response"]) < 200]
    return prepared(tmp_path_factory.mktemp("train-data"), short[:6], tokenizer_path, max_length=128, test_size=2)


def prepared(folder: Path, records: list[dict], tokenizer_path: str, **settings) -> Path:
    """`records` written to `folder`/slice.jsonl and prepared into `folder`/shards (on the running Ray)."""
    import json

    from pipelines.configs import PrepareConfig
    from pipelines.prepare import prepare

    (folder / "slice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(PrepareConfig(source=str(folder / "slice.jsonl"), output_dir=folder / "shards", tokenizer=tokenizer_path, **settings))
    return folder / "shards"


CHROMIUM = "/usr/bin/chromium"
# Without the networking flags, this machine's closed network floods Chromium with refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed if missing (Playwright's own browser download cannot work here)."""
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None:
            pytest.skip("no chromium and no apt-get to install it")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=900)
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
