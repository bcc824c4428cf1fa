"""Generated tokens -> the response text, streamed as deltas with exactly Dolly's result.

The streamed deltas add up to `contract.extract_response` of the whole generation: text stops at
`### End`, at `### Instruction:` and at the request's stop strings, and surrounding whitespace is
dropped. A delta never shows text that a later token could turn into a stop, or whitespace that
could turn out to be the response's end.
"""

from __future__ import annotations

from contract import END_KEY, INSTRUCTION_KEY


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stops = (END_KEY, INSTRUCTION_KEY, *(s for s in stop if s))
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The text streamed so far: the whole response once `stopped` or `finish` was called."""
        return self._text[: self._sent]

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text that is now certain. Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        # A character split across tokens decodes as U+FFFD until its last byte arrives.
        self._text = (
            self._tokenizer.decode(self._ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            .rstrip("\ufffd")
            .lstrip()
        )
        cuts = [i for i in (self._text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._emit(len(self._text[: min(cuts)].rstrip()))
        return self._emit(len(self._text) - self._held_back())

    def finish(self) -> str:
        """The rest of the text, once generation ended without a stop string."""
        return "" if self.stopped else self._emit(len(self._text.rstrip()))

    def _held_back(self) -> int:
        text = self._text
        held = len(text) - len(text.rstrip())
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return held

    def _emit(self, end: int) -> str:
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
