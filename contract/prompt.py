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


def fold_turns(history: list[tuple[str, str]], dropped: int = 0) -> str:
    """The `Input:` context that a conversation's earlier messages, as (role, content), become:
    Dolly was trained single-turn. System messages come first, then the turns as "User: ..." and
    "Assistant: ..." lines, less the `dropped` oldest turns. CHAT_TEMPLATE folds alike."""
    system = [content for role, content in history if role == "system"]
    turns = [f"{_SPEAKERS[role]}: {content}" for role, content in history if role != "system"]
    return "\n".join(system + turns[dropped:])


_SPEAKERS = {"user": "User", "assistant": "Assistant"}

# Dolly's prompt as a chat template, written into every export's tokenizer config, so that any
# server (vLLM, TGI, llama.cpp, transformers' pipeline) prompts the model as it was trained: the
# last user message is the instruction, the messages before it fold into `Input:` as in
# fold_turns, and the generation prompt ends with "### Response:" and its newline. A conversation
# ending with the assistant's answer renders as a training example, "### End" included.
# tests/test_contract.py holds it byte for byte to the functions above.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=[], turns=[]) -%}"
    "{%- set answered = messages[-1]['role'] == 'assistant' -%}"
    "{%- set asked = messages[:-1] if answered else messages -%}"
    "{%- for m in asked[:-1] -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + [m['content']] -%}"
    "{%- else -%}{%- set ns.turns = ns.turns + [@SPEAKERS@[m['role']] ~ ': ' ~ m['content']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set context = (ns.system + ns.turns) | join('\\n') -%}"
    "{{- @INTRO@ ~ '\\n\\n' ~ @INSTRUCTION@ ~ '\\n' ~ asked[-1]['content'] -}}"
    "{%- if context -%}{{- '\\n\\n' ~ @INPUT@ ~ '\\n' ~ context -}}{%- endif -%}"
    "{%- if answered -%}{{- '\\n\\n' ~ @RESPONSE@ ~ messages[-1]['content'] ~ '\\n\\n' ~ @END@ -}}"
    "{%- elif add_generation_prompt -%}{{- '\\n\\n' ~ @RESPONSE@ -}}{%- endif -%}"
)
for _marker, _value in {
    "@SPEAKERS@": repr(_SPEAKERS),
    "@INTRO@": repr(INTRO_BLURB),
    "@INSTRUCTION@": repr(INSTRUCTION_KEY),
    "@INPUT@": repr(INPUT_KEY),
    "@RESPONSE@": repr(RESPONSE_KEY_NL),
    "@END@": repr(END_KEY),
}.items():
    CHAT_TEMPLATE = CHAT_TEMPLATE.replace(_marker, _value)


def extract_response(completion: str) -> str:
    """The answer in generated text that follows the prompt, stopping at "### End".

    A model that misses "### End" sometimes starts a new "### Instruction:" block instead; that
    is cut too, so a user never sees the model inventing the next question.
    """
    for marker in (END_KEY, INSTRUCTION_KEY):
        completion = completion.split(marker, 1)[0]
    return completion.strip()
