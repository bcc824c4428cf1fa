"""The OpenAI-compatible request bodies. Unknown fields are refused rather than ignored, so a
client never believes a setting took effect when it did not; each check names its field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract import RESERVED_MARKERS
from contract.sampling import SamplingParams
from services.config import SamplingDefaults


def _no_reserved_marker(text: str) -> str:
    # The markers steer the prompt template and stop generation: text holding them would let a
    # client rewrite the prompt around its own instruction.
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise ValueError(f"must not contain the prompt marker {marker!r}")
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: 0 disables top-k")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="lower a token's logit by this for each time it was generated already"
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="lower a token's logit by this once it has been generated"
    )
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self, defaults: SamplingDefaults, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            frequency_penalty=defaults.frequency_penalty if self.frequency_penalty is None else self.frequency_penalty,
            presence_penalty=defaults.presence_penalty if self.presence_penalty is None else self.presence_penalty,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    """`prompt` is the instruction; Dolly's template is put around it (with `context`, an
    extension, as its `Input:` block)."""

    prompt: str = Field(..., min_length=1)
    context: str = ""

    _prompt_markers = field_validator("prompt", "context")(_no_reserved_marker)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content):
        # OpenAI clients (and Gradio's chat history) may send content as a list of typed parts.
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f'part {i} is {kind!r}: this model reads text parts only ({{"type": "text", "text": ...}})')
            texts.append(part["text"])
        return "".join(texts)

    _content_markers = field_validator("content")(_no_reserved_marker)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages):
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's: it is the instruction the model answers")
        return messages

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
