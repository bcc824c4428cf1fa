"""The pieces of a serving replica that decide what text a request gets: sampling, streamed
text, prompt folding and trimming, and the typed serving config."""

from __future__ import annotations

import asyncio
import logging
import random
import re

import pytest
import torch
from pydantic import ValidationError
from transformers import TopPLogitsWarper

from contract import END_KEY, extract_response
from contract.decode import BatchDecoder
from contract.errors import UserError
from contract.sampling import SamplingParams, generators_for, penalize, sample
from services.auth import ApiKeys
from services.config import AuthConfig, EngineConfig, ServeConfig
from services.prompts import PromptBuilder, PromptTooLong
from services.protocol import ChatMessage
from services.text import TextStream

pytestmark = pytest.mark.timeout(120)


def test_nucleus_sampling_keeps_exactly_the_tokens_transformers_keeps():
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    kept = TopPLogitsWarper(0.9)(None, logits.clone()).isfinite()[0]
    probs = logits.softmax(-1)[0]
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    rows = 4000
    draws = sample(logits.repeat(rows, 1), [SamplingParams(top_p=0.9)] * rows, [None] * rows)
    frequency = torch.bincount(draws, minlength=40) / rows
    assert set(draws.tolist()) <= set(kept.nonzero()[:, 0].tolist())
    assert (frequency - expected).abs().max() < 0.03


def test_temperature_zero_is_greedy_and_top_k_limits_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]]).repeat(500, 1)
    greedy = sample(logits, [SamplingParams(temperature=0)] * 500, [None] * 500)
    assert set(greedy.tolist()) == {1}
    top2 = sample(logits, [SamplingParams(top_k=2, top_p=1.0)] * 500, [None] * 500)
    assert set(top2.tolist()) == {1, 2}


def test_a_seeded_row_draws_the_same_tokens_whatever_it_is_batched_with():
    logits = torch.randn(3, 1000)
    seeded = SamplingParams(seed=7, top_p=1.0)
    alone = [sample(logits[:1], [seeded], generators_for([seeded], logits.device)).item() for _ in range(2)]
    params = [seeded, SamplingParams(), SamplingParams(seed=1)]
    batched = sample(logits, params, generators_for(params, logits.device))
    assert alone[0] == alone[1] == batched[0].item()


def test_penalties_lower_only_the_tokens_a_row_has_generated_as_openai_defines_them():
    logits = torch.zeros(3, 5)
    counts = torch.tensor([[0.0, 1, 3, 0, 0], [0, 1, 3, 0, 0], [0, 1, 3, 0, 0]])
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=2.0), SamplingParams()]
    got = penalize(logits, counts, params)
    assert got[0].tolist() == [0, -0.5, -1.5, 0, 0]  # per time generated
    assert got[1].tolist() == [0, -2.0, -2.0, 0, 0]  # once generated
    assert got[2].tolist() == [0] * 5  # a row that asks for none is untouched
    assert penalize(logits, counts, [SamplingParams()] * 3) is logits, "no penalty asked: no work"


def test_a_penalized_row_stops_repeating_itself_and_its_neighbours_are_untouched(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    greedy, never_again = SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=1e4)
    prompt = list(range(1000, 1010))

    def decode(params: list[SamplingParams], n: int = 24) -> list[list[int]]:
        decoder = BatchDecoder(model, pad_id=0)
        rows = [[t] for t in decoder.add([prompt] * len(params), params)[1]]
        for _ in range(n - 1):
            for row, token in zip(rows, decoder.step()):
                row.append(token)
        return rows

    [plain] = decode([greedy])
    assert len(set(plain)) < len(plain), "the tiny model's greedy answer repeats tokens: nothing to test otherwise"
    penalized, neighbour = decode([never_again, greedy])
    assert len(set(penalized)) == len(penalized) and neighbour == plain


def test_a_stop_token_is_held_back_until_the_answer_has_min_tokens(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = list(range(1000, 1010))
    first = BatchDecoder(model, pad_id=0).add([prompt], [SamplingParams(temperature=0)])[1][0]
    decoder = BatchDecoder(model, pad_id=0, stop_ids={first})  # the greedy answer's first token now ends it
    held, free = SamplingParams(temperature=0, min_tokens=3), SamplingParams(temperature=0, min_tokens=0)
    rows = [[t] for t in decoder.add([prompt, prompt], [held, free])[1]]
    for _ in range(3):
        for row, token in zip(rows, decoder.step()):
            row.append(token)
    assert rows[1][0] == first, "a row that asks for no minimum would answer with nothing"
    assert first not in rows[0][:3], "the stop is never drawn before the third token"


def test_serving_holds_back_a_first_stop_where_its_engine_can():
    assert ServeConfig(model="m").min_tokens == 1
    assert ServeConfig(model="m", engine={"batching": "continuous"}).min_tokens == 0
    assert ServeConfig(model="m", defaults={"min_tokens": 4}).min_tokens == 4


def stream_in_pieces(tokenizer, text: str, stop=(), seed=0) -> tuple[str, list[str], bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream, deltas, rng, i = TextStream(tokenizer, stop), [], random.Random(seed), 0
    while i < len(ids) and not stream.stopped:
        n = rng.randint(1, 3)
        deltas.append(stream.add(ids[i : i + n]))
        i += n
    deltas.append(stream.finish())
    return "".join(deltas), deltas, stream.stopped


@pytest.mark.parametrize(
    "completion",
    [
        "  Paris is the capital.  \n\n### End\n\nmore",
        "First line.\n\nSecond line\n\n### Instruction:\nnext question",
        "An answer that never ends ##",
        "Les élèves ont mangé 🍰 ensemble.\n\n",
    ],
)
def test_streamed_deltas_add_up_to_dolly_extract_response(tokenizer, completion):
    for seed in range(5):
        text, _, _ = stream_in_pieces(tokenizer, completion, seed=seed)
        assert text == extract_response(completion)


def test_a_stop_string_ends_the_text_and_is_never_streamed_in_part(tokenizer):
    text, deltas, stopped = stream_in_pieces(tokenizer, "one two STOP three", stop=("STOP",))
    assert stopped and text == "one two"
    assert not any("S" in d for d in deltas)


def test_end_marker_typed_as_plain_text_also_stops(tokenizer):
    assert stream_in_pieces(tokenizer, f"yes\n\n{END_KEY.replace('End', '')}End after")[0] == "yes"


def test_a_conversation_becomes_one_dolly_prompt_with_the_history_as_input(tokenizer):
    builder = PromptBuilder(tokenizer, 2048)
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="Name a colour."),
    ]
    prompt = builder.chat(messages, 64)
    text = tokenizer.decode(prompt.ids)
    assert "### Instruction:\nName a colour.\n\nInput:\nBe brief.\nUser: Hi\nAssistant: Hello!\n\n### Response:\n" in text
    assert prompt.trimmed_turns == 0 and prompt.max_tokens == 64


def test_the_oldest_turns_are_trimmed_first_until_the_answer_fits(tokenizer):
    turns = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "words " * 30) for i in range(6)]
    messages = [ChatMessage(role="system", content="Stay kind."), *turns, ChatMessage(role="user", content="Last?")]
    full = len(PromptBuilder(tokenizer, 4096).chat(messages, 64).ids)
    builder = PromptBuilder(tokenizer, full + 64 - 70)  # about two turns too long
    prompt = builder.chat(messages, 64)
    text = tokenizer.decode(prompt.ids)
    assert prompt.trimmed_turns == 2 and len(prompt.ids) + 64 <= builder.context_limit
    assert "turn 0" not in text and "turn 1" not in text and "turn 2" in text and "Stay kind." in text


def test_a_prompt_longer_than_the_context_states_the_limit(tokenizer):
    with pytest.raises(PromptTooLong, match="the model's context is 64 tokens"):
        PromptBuilder(tokenizer, 64).completion("word " * 100, "", 8)
    room = PromptBuilder(tokenizer, 64).completion("short", "", 500)
    assert len(room.ids) + room.max_tokens == 64


def test_serve_config_compiles_into_serve_deployment_options():
    config = ServeConfig(model="m", deployment={"min_replicas": 1, "max_replicas": 3, "max_queued_requests": 5, "num_cpus": 0.5})
    options = config.model_deployment_options()
    assert options["autoscaling_config"]["min_replicas"] == 1 and options["autoscaling_config"]["max_replicas"] == 3
    assert options["max_queued_requests"] == 5 and options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert config.ingress_deployment_options()["backpressure_config"] == {"status_code": 503, "retry_after_s": 2}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"deployment": {"min_replicas": 3, "max_replicas": 2}},
            "deployment.min_replicas (3) is above deployment.max_replicas (2)",
        ),
        ({"deployment": {"max_ongoing_requests": 4}, "engine": {"max_batch_size": 8}}, "below engine.max_batch_size"),
        ({"engine": {"batching": "static"}}, "'dynamic' or 'continuous'"),
        ({"deployment": {"max_replica": 2}}, "Extra inputs are not permitted"),
        (
            {"engine": {"batching": "continuous"}, "defaults": {"frequency_penalty": 0.3}},
            "defaults.frequency_penalty needs engine.batching=dynamic",
        ),
        (
            {"engine": {"batching": "continuous"}, "defaults": {"min_tokens": 1}},
            "defaults.min_tokens needs engine.batching=dynamic",
        ),
        (
            {"engine": {"batching": "continuous"}, "defaults": {"top_k": 40}},
            "defaults.top_k needs engine.continuous_top_k=true",
        ),
    ],
)
def test_inconsistent_serve_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        ServeConfig(model="m", **settings)


def test_api_keys_come_from_the_environment_or_a_mounted_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DOLLY_API_KEYS", "alpha, beta")
    secret = tmp_path / "api-keys"
    secret.write_text("gamma\n\n")
    keys = ApiKeys(AuthConfig(api_keys_file=secret))
    assert all(keys.allows(f"Bearer {k}") for k in ("alpha", "beta", "gamma"))
    assert not any(keys.allows(h) for h in (None, "", "Bearer", "Bearer delta", "Basic alpha", "alpha"))


def test_no_keys_refuses_to_start_and_no_auth_is_logged_loudly(monkeypatch, caplog):
    monkeypatch.delenv("DOLLY_API_KEYS", raising=False)
    with pytest.raises(UserError, match="no API keys: set DOLLY_API_KEYS"):
        ApiKeys(AuthConfig())
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        open_door = ApiKeys(AuthConfig(insecure_no_auth=True))
    assert open_door.allows(None) and "answers ANYONE" in caplog.text


def test_rows_joining_and_leaving_a_running_batch_decode_as_they_would_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # sharp attention, so that a wrong position or a stray pad would change the tokens
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(4)
    greedy = SamplingParams(temperature=0)
    prompts = [list(range(1000, 1040)), list(range(2000, 2020)), list(range(3000, 3005))]

    def alone(prompt: list[int], n: int) -> list[int]:
        decoder = BatchDecoder(model, pad_id=0)
        tokens = decoder.add([prompt], [greedy])[1]
        return tokens + [decoder.step()[0] for _ in range(n - 1)]

    decoder, got = BatchDecoder(model, pad_id=0), {}

    def record(rows, tokens):
        for row, token in zip(rows, tokens):
            got.setdefault(row, []).append(token)

    record(*decoder.add(prompts[:1], [greedy]))
    for _ in range(4):
        record(list(decoder.rows), decoder.step())
    record(*decoder.add(prompts[1:], [greedy, greedy]))  # two newcomers, shorter than the running row
    for _ in range(6):
        record(list(decoder.rows), decoder.step())
    decoder.keep(decoder.rows[1:])  # the longest row leaves: its padding columns go too
    for _ in range(5):
        record(list(decoder.rows), decoder.step())
    assert got == {0: alone(prompts[0], 11), 1: alone(prompts[1], 12), 2: alone(prompts[2], 12)}


def continuous_answers(model, stop_ids: set[int], requests: list[SamplingParams], **settings) -> list[list[int] | Exception]:
    """Each request's tokens from one continuous-batching engine, one request after another (or its error)."""
    from services.engines import ContinuousBatchingEngine, Job  # imports Ray

    engine = ContinuousBatchingEngine(model, stop_ids, 0, EngineConfig(batching="continuous", max_batch_size=2, **settings), 128)
    prompt = list(range(1000, 1010))

    async def answer(params: SamplingParams) -> list[int] | Exception:
        try:
            return [step.token async for step in engine.steps(Job(prompt, params)) if step.token is not None]
        except RuntimeError as e:
            return e

    try:
        return [asyncio.run(answer(params)) for params in requests]
    finally:
        engine.shutdown()


def test_continuous_batching_decodes_greedy_at_the_argmax_and_refuses_top_k_unless_configured(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    greedy = SamplingParams(temperature=0, max_tokens=12)
    decoder = BatchDecoder(model, pad_id=0)
    argmax = decoder.add([list(range(1000, 1010))], [greedy])[1] + [decoder.step()[0] for _ in range(11)]
    refused, answer = continuous_answers(model, set(), [SamplingParams(top_k=5, max_tokens=4), greedy])
    assert isinstance(refused, RuntimeError) and "top_k" in str(refused), "a top_k it cannot apply is refused, not ignored"
    assert answer == argmax


def test_continuous_batching_with_top_k_configured_samples_within_the_top_k(tokenizer):
    from contract.models import load_model

    torch.manual_seed(0)
    model = load_model("pythia-14m-random", tokenizer).eval()  # random weights: a flat next-token distribution
    hot = dict(temperature=2.0, top_p=1.0, max_tokens=8)
    greedy, top_1, anything = continuous_answers(
        model,
        set(),
        [SamplingParams(temperature=0, max_tokens=8), SamplingParams(top_k=1, **hot), SamplingParams(**hot)],
        continuous_top_k=True,
    )
    assert top_1 == greedy and anything != greedy
