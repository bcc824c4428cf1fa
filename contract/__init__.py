"""The model contract shared by training, serving and evaluation. Import from here, never re-type
a template string.

- `contract.prompt`: Dolly's template and special tokens (re-exported here; no heavy imports).
- `contract.models`: tokenizer and model loading (`from contract.models import load_tokenizer`);
  it imports transformers, so it is not pulled in by `import contract`.
"""

from contract.prompt import (
    CHAT_TEMPLATE,
    END_KEY,
    IGNORE_INDEX,
    INPUT_KEY,
    INSTRUCTION_KEY,
    INTRO_BLURB,
    RESERVED_MARKERS,
    RESPONSE_KEY,
    RESPONSE_KEY_NL,
    SPECIAL_TOKENS,
    extract_response,
    fold_turns,
    render_generation_prompt,
    render_training_example,
)

__all__ = [
    "CHAT_TEMPLATE",
    "END_KEY",
    "IGNORE_INDEX",
    "INPUT_KEY",
    "INSTRUCTION_KEY",
    "INTRO_BLURB",
    "RESERVED_MARKERS",
    "RESPONSE_KEY",
    "RESPONSE_KEY_NL",
    "SPECIAL_TOKENS",
    "extract_response",
    "fold_turns",
    "render_generation_prompt",
    "render_training_example",
]
