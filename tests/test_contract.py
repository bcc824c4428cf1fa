"""The prompt contract: Dolly's strings byte for byte, its special tokens, response extraction, and
the chat template that carries the prompt to other servers."""

from __future__ import annotations

import pytest

from contract import CHAT_TEMPLATE, END_KEY, extract_response, fold_turns, render_generation_prompt, render_training_example
from contract.models import load_model, pythia_config, special_token_ids

INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_training_example_without_context_is_dollys_exact_text():
    assert render_training_example("Name a colour.", "Blue.") == (
        f"{INTRO}\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.\n\n### End"
    )


def test_training_example_with_context_has_an_input_block():
    assert render_training_example("Summarize.", "Short.", context="A long text.") == (
        f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nA long text.\n\n### Response:\nShort.\n\n### End"
    )


def test_generation_prompt_ends_with_response_key_and_newline():
    assert render_generation_prompt("Name a colour.") == f"{INTRO}\n\n### Instruction:\nName a colour.\n\n### Response:\n"


def test_generation_prompt_with_context_mirrors_training_format():
    prompt = render_generation_prompt("Summarize.", "A long text.")
    assert prompt == f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nA long text.\n\n### Response:\n"
    assert render_training_example("Summarize.", "Short.", "A long text.").startswith(prompt)


def test_empty_context_renders_no_input_block():
    assert render_generation_prompt("Q", "") == render_generation_prompt("Q")
    assert "Input:" not in render_training_example("Q", "A", "")


@pytest.mark.parametrize(
    ("completion", "response"),
    [
        ("Blue.\n\n### End", "Blue."),
        ("  Blue.\n\n### End\nrambling after the end", "Blue."),
        ("Blue.\n\n### Instruction:\nInvented next question", "Blue."),
        ("Blue, without an end marker", "Blue, without an end marker"),
        ("### End", ""),
    ],
)
def test_extract_response_stops_at_end_marker(completion, response):
    assert extract_response(completion) == response


def test_tokenizer_gets_dollys_special_tokens_and_pad_equals_eos(tokenizer):
    assert special_token_ids(tokenizer) == {"### End": 50277, "### Instruction:": 50278, "### Response:\n": 50279}
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(END_KEY) == 50277


def test_model_embeddings_are_resized_to_dolly_v2s_vocabulary(tokenizer):
    model = load_model("pythia-14m-random", tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 50280
    assert model.get_output_embeddings().weight.shape[0] == 50280


def test_random_pythia_14m_has_pythia_14ms_parameter_count():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(pythia_config("14m"))
    assert sum(p.numel() for p in model.parameters()) == 14_067_712


def test_unknown_random_shape_is_refused_with_the_known_names(tokenizer):
    with pytest.raises(ValueError, match="pythia-70m-random"):
        load_model("pythia-3m-random", tokenizer)


def test_max_length_comes_from_the_model_config_then_the_tokenizer(tokenizer, tokenizer_path):
    from contract.models import max_length_for

    assert max_length_for("pythia-70m-random", tokenizer) == (2048, "pythia-70m-random config")
    # The shared folder holds only a tokenizer: its model_max_length is the next source.
    assert max_length_for(tokenizer_path, tokenizer) == (2048, "tokenizer model_max_length")


CONVERSATIONS = {
    "no context": [{"role": "user", "content": "Name a colour."}],
    "a system message as context": [
        {"role": "system", "content": "Cats sleep most of the day."},
        {"role": "user", "content": "Summarize this."},
    ],
    "several turns": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Another one?"},
    ],
}


@pytest.fixture(scope="module")
def templated(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_the_chat_template_renders_dollys_generation_prompt_byte_for_byte(templated, case):
    *history, last = CONVERSATIONS[case]
    expected = render_generation_prompt(last["content"], fold_turns([(m["role"], m["content"]) for m in history]))
    assert templated.apply_chat_template(CONVERSATIONS[case], tokenize=False, add_generation_prompt=True) == expected
    # Without the generation prompt, the conversation so far: no "### Response:" to complete yet.
    assert templated.apply_chat_template(CONVERSATIONS[case], tokenize=False) == expected.removesuffix("\n\n### Response:\n")


def test_a_conversation_ending_with_the_answer_renders_as_a_training_example(templated):
    messages = [*CONVERSATIONS["a system message as context"], {"role": "assistant", "content": "Cats nap."}]
    rendered = templated.apply_chat_template(messages, tokenize=False)
    assert rendered == render_training_example("Summarize this.", "Cats nap.", "Cats sleep most of the day.")


def test_the_chat_template_folds_a_conversation_as_the_api_does(templated):
    from services.prompts import PromptBuilder
    from services.protocol import ChatMessage

    messages = CONVERSATIONS["several turns"]
    served = PromptBuilder(templated, context_limit=2048).chat([ChatMessage(**m) for m in messages], max_tokens=64)
    assert served.trimmed_turns == 0
    assert served.ids == templated.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_an_answer_the_assistant_has_begun_is_continued_as_transformers_continue_final_message_renders_it(templated):
    from services.prompts import PromptBuilder
    from services.protocol import ChatMessage

    messages = [*CONVERSATIONS["a system message as context"], {"role": "assistant", "content": "Cats"}]
    served = PromptBuilder(templated, context_limit=2048).chat([ChatMessage(**m) for m in messages], max_tokens=64)
    rendered = templated.apply_chat_template(messages, continue_final_message=True, return_dict=True)["input_ids"]
    assert served.ids == rendered
    assert templated.decode(served.ids).endswith("### Response:\nCats")


def test_a_model_folder_carries_its_decoding_in_generation_config_json_as_transformers_and_vllm_read_it(tmp_path):
    from transformers import GenerationConfig

    from contract import generation
    from contract.decoding import Decoding

    assert Decoding.of_model(tmp_path) == Decoding(), "a folder without one decodes as Dolly"
    chosen = Decoding(temperature=0.7, frequency_penalty=0.3, max_tokens=200)
    chosen.generation_config(eos_token_id=7, pad_token_id=1).save_pretrained(tmp_path)
    assert Decoding.of_model(tmp_path) == chosen
    read = GenerationConfig.from_pretrained(tmp_path)  # what generate() and vLLM's defaults take
    assert (read.temperature, read.top_p, read.max_new_tokens, read.eos_token_id) == (0.7, generation.TOP_P, 200, 7)
    Decoding(temperature=0).generation_config(eos_token_id=7, pad_token_id=1).save_pretrained(tmp_path)
    assert Decoding.of_model(tmp_path).temperature == 0 and not GenerationConfig.from_pretrained(tmp_path).do_sample
    assert chosen.describe() == "T 0.7, top_p 0.92, frequency penalty 0.3, at most 200 new tokens"
