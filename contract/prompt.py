"""Dolly's prompt template: the one place training, serving and evaluation get it from.

The strings are Dolly 2.0's, byte for byte (databrickslabs/dolly `training/consts.py`), because
a model only answers well when it is prompted exactly as it was trained.
"""

from __future__ import annotations

INTRO_BLURB = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
# The tokenizer learns "### Response:\n" (with its newline) as one token, so the label mask can
# end exactly where the response begins.
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"
# The label of a token that carries no loss (the prompt, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100

# Order matters: on the Pythia tokenizer these become ids 50277, 50278, 50279, as in dolly-v2.
SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)

# Markers a record must not contain: they would move the loss mask or stop generation early.
RESERVED_MARKERS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY)


def _prompt(instruction: str, context: str = "") -> str:
    parts = [INTRO_BLURB, f"{INSTRUCTION_KEY}\n{instruction}"]
    if context:
        parts.append(f"{INPUT_KEY}\n{context}")
    parts.append(RESPONSE_KEY_NL)
    return "\n\n".join(parts)


def render_generation_prompt(instruction: str, context: str = "") -> str:
    """The prompt the model completes: it ends with "### Response:" and a newline.

    Dolly's own pipeline drops the context here; we keep the `Input:` block, so that a prompt
    with context looks exactly like the training examples that had one.
    """
    return _prompt(instruction, context)


def render_training_example(instruction: str, response: str, context: str = "") -> str:
    """A full training example: the generation prompt, the response, then "### End"."""
    return f"{_prompt(instruction, context)}{response}\n\n{END_KEY}"


def extract_response(completion: str) -> str:
    """The answer in generated text that follows the prompt, stopping at "### End".

    A model that misses "### End" sometimes starts a new "### Instruction:" block instead; that
    is cut too, so a user never sees the model inventing the next question.
    """
    for marker in (END_KEY, INSTRUCTION_KEY):
        completion = completion.split(marker, 1)[0]
    return completion.strip()
