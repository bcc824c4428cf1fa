"""Requests -> Dolly prompts that fit the model's context.

Dolly was trained single-turn, so a conversation is folded into one prompt: the last user
message is the instruction, and the system messages and earlier turns become its `Input:`
context (contract.prompt.fold_turns, as the exports' chat template does). Assistant text after
the instruction is the start of the answer, which the model continues, as transformers'
`continue_final_message` renders it. When that does not fit with room for the answer, the oldest
turns go first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract import fold_turns, render_generation_prompt
from contract.errors import UserError
from contract.models import max_length_for


def context_limit(folder: Path, tokenizer, max_context: int | None) -> int:
    """The tokens a prompt and its answer share: `engine.max_context`, else the model's."""
    return max_context or max_length_for(str(folder), tokenizer)[0]


class PromptTooLong(UserError):
    pass


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_tokens: int  # what the answer may use: the request's, or less where the context ends first
    trimmed_turns: int = 0


class PromptBuilder:
    def __init__(self, tokenizer, context_limit: int):
        self._tokenizer = tokenizer
        self.context_limit = context_limit

    def completion(self, instruction: str, context: str, max_tokens: int) -> Prompt:
        return self._fit(self.tokenize(render_generation_prompt(instruction, context)), max_tokens)

    def chat(self, messages: list, max_tokens: int) -> Prompt:
        at = max(i for i, m in enumerate(messages) if m.role == "user")
        after = messages[at + 1 :]
        history = [(m.role, m.content) for m in messages[:at]] + [("system", m.content) for m in after if m.role == "system"]
        begun = "".join(m.content for m in after if m.role == "assistant")

        def ids(dropped: int) -> list[int]:
            return self.tokenize(render_generation_prompt(messages[at].content, fold_turns(history, dropped)) + begun)

        # The fewest oldest turns to drop so that the answer still has max_tokens of room;
        # dropping more never lengthens the prompt, so a binary search finds it.
        budget = self.context_limit - max_tokens
        low, high = 0, sum(role != "system" for role, _ in history)
        while low < high:
            middle = (low + high) // 2
            if len(ids(middle)) <= budget:
                high = middle
            else:
                low = middle + 1
        prompt = self._fit(ids(low), max_tokens)
        return Prompt(prompt.ids, prompt.max_tokens, trimmed_turns=low)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit(self, ids: list[int], max_tokens: int) -> Prompt:
        if len(ids) >= self.context_limit:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens, but the model's context is {self.context_limit} "
                f"tokens (prompt and answer together): shorten the prompt"
            )
        return Prompt(ids, min(max_tokens, self.context_limit - len(ids)))
