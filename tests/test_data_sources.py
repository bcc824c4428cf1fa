"""Where `dolly up` takes its corpus from: what it is told, else the Hub, else our built-in sample."""

from __future__ import annotations

import json

import pytest

from contract.records import DOLLY_CATEGORIES
from pipelines.sources import BUILTIN_SAMPLE, DOLLY_HUB_ID, choose_source

pytestmark = pytest.mark.timeout(300)


def test_an_explicit_corpus_wins_then_the_environment(monkeypatch):
    monkeypatch.setenv("DOLLY_DATA", "from-env.jsonl")
    assert choose_source("given.jsonl") == ("given.jsonl", "given with --data")
    assert choose_source(None) == ("from-env.jsonl", "from $DOLLY_DATA")


def test_without_the_hub_the_built_in_sample_is_used_and_the_reason_said(monkeypatch):
    monkeypatch.delenv("DOLLY_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, why = choose_source(None)
    assert source == str(BUILTIN_SAMPLE) and "Hub is unreachable" in why


def test_an_unreachable_hub_endpoint_falls_back_quickly(monkeypatch):
    monkeypatch.delenv("DOLLY_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert choose_source(None, hub_timeout_s=2)[0] == str(BUILTIN_SAMPLE)


def test_the_hub_is_used_when_it_answers(monkeypatch):
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200 if self.path == f"/api/datasets/{DOLLY_HUB_ID}" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("DOLLY_DATA", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert choose_source(None) == (DOLLY_HUB_ID, "from the Hugging Face Hub")
    finally:
        server.shutdown()


def test_the_built_in_sample_covers_every_dolly_category_and_prepares_without_rejects(tmp_path, tokenizer_path, ray_cluster):
    from pipelines.configs import PrepareConfig
    from pipelines.prepare import prepare

    records = [json.loads(line) for line in BUILTIN_SAMPLE.open()]
    assert {r["category"] for r in records} == set(DOLLY_CATEGORIES)
    result = prepare(
        PrepareConfig(source=str(BUILTIN_SAMPLE), output_dir=tmp_path, tokenizer=tokenizer_path, max_length=256, test_size=8)
    )
    counts = result.manifest["counts"]
    assert counts["read"] == counts["kept"] == len(records) and not counts["rejected"]  # rejects by reason: none
