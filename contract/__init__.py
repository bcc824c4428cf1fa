"""The model contract shared by training, serving and evaluation: prompt template, special
tokens, and model and tokenizer loading. Import from here, never re-type a template string."""

from contract.models import (
    PYTHIA_SHAPES,
    load_model,
    load_tokenizer,
    max_length_for,
    pythia_config,
    random_pythia_size,
    resize_for_tokenizer,
    special_token_ids,
)
from contract.prompt import (
    END_KEY,
    INPUT_KEY,
    INSTRUCTION_KEY,
    INTRO_BLURB,
    RESERVED_MARKERS,
    RESPONSE_KEY,
    RESPONSE_KEY_NL,
    SPECIAL_TOKENS,
    extract_response,
    render_generation_prompt,
    render_training_example,
)

__all__ = [
    "END_KEY",
    "INPUT_KEY",
    "INSTRUCTION_KEY",
    "INTRO_BLURB",
    "PYTHIA_SHAPES",
    "RESERVED_MARKERS",
    "RESPONSE_KEY",
    "RESPONSE_KEY_NL",
    "SPECIAL_TOKENS",
    "extract_response",
    "load_model",
    "load_tokenizer",
    "max_length_for",
    "pythia_config",
    "random_pythia_size",
    "render_generation_prompt",
    "render_training_example",
    "resize_for_tokenizer",
    "special_token_ids",
]
