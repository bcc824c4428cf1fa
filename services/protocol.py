"""The OpenAI-compatible request bodies. Unknown fields are refused rather than ignored, so a
client never believes a setting took effect when it did not; each check names its field."""

from __future__ import annotations

from typing import Annotated, Literal

import openai
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from contract import RESERVED_MARKERS
from contract.decoding import Decoding
from contract.records import DOLLY_CATEGORIES
from contract.sampling import SamplingParams
from services.config import CONTINUOUS_LACKS, EngineConfig, SamplingDefaults


def _no_reserved_marker(text: str) -> str:
    # The markers steer the prompt template and stop generation: text holding them would let a
    # client rewrite the prompt around its own instruction.
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise ValueError(f"must not contain the prompt marker {marker!r}")
    return text


StopString = Annotated[str, Field(min_length=1)]
# One string or a list of them, as OpenAI takes it; validated as the list, so an error names
# `stop` (or `stop.2`), not a branch of a union.
Stops = Annotated[
    list[StopString],
    Field(max_length=4),
    BeforeValidator(
        lambda stop: [stop] if isinstance(stop, str) else stop,
        json_schema_input_type=StopString | Annotated[list[StopString], Field(max_length=4)],
    ),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False,
        description="extension (vLLM's): with include_usage, every chunk carries the usage so far, so a client "
        "whose stream was cut knows the tokens left of its max_tokens when it asks for the rest",
    )


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
    min_tokens: int | None = Field(
        None, ge=0, description="extension (vLLM's): the answer cannot stop before it has this many tokens"
    )
    stop: Stops | None = Field(None, description="up to 4 stop strings")
    # 2^53 - 1 rather than int64's limit: JSON parsers (and FastAPI's /openapi.json, which writes
    # bounds as floats) keep integers exact only up to there (RFC 8259, section 6).
    seed: int | None = Field(None, ge=0, le=2**53 - 1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self, defaults: SamplingDefaults, max_tokens: int, min_tokens: int) -> SamplingParams:
        """This request's parameters; those it leaves out are `defaults` (and `min_tokens`)."""
        return SamplingParams(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            frequency_penalty=defaults.frequency_penalty if self.frequency_penalty is None else self.frequency_penalty,
            presence_penalty=defaults.presence_penalty if self.presence_penalty is None else self.presence_penalty,
            max_tokens=max_tokens,
            min_tokens=min(min_tokens if self.min_tokens is None else self.min_tokens, max_tokens),
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )

    def unsupported_by(self, engine: EngineConfig) -> tuple[str, str] | None:
        """(the setting, why) for the first setting this request asks for that `engine` cannot apply."""
        if self.seed is not None and engine.batching == "continuous":
            return "seed", "seed needs engine.batching=dynamic: continuous batching has one random stream for all requests"
        for setting, lacking in CONTINUOUS_LACKS.items():
            if getattr(self, setting) and engine.batching == "continuous":
                return setting, f"{setting} needs engine.batching=dynamic: transformers' continuous batching has {lacking}"
        if self.top_k and not engine.has_top_k:
            return "top_k", (
                "top_k needs engine.continuous_top_k=true: this server's continuous batching runs without top-k, "
                "which would sort the whole vocabulary for every request"
            )
        return None

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
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        description=(
            "The last user message is the instruction; the messages before it and every system message "
            "become its context. Assistant text after it is the beginning of the answer, which the "
            "model continues (as vLLM's continue_final_message)."
        ),
        # JSON Schema cannot point at the last item, so the rule is stated the way it can be: at
        # least one user message. services/prompts.py gives every such list a meaning.
        json_schema_extra={"contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}},
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    @field_validator("messages")
    @classmethod
    def _has_user(cls, messages):
        if not any(m.role == "user" for m in messages):
            raise ValueError("needs a user message: the last one is the instruction the model answers")
        return messages

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ErrorDetail(BaseModel):
    message: str = Field(..., description="what went wrong and how to fix it")
    type: str = Field(..., description="invalid_request_error, authentication_error, not_found_error, overloaded_error, ...")
    param: str | None = Field(..., description="the request field at fault, as messages.1.content")
    code: int = Field(..., description="the HTTP status")


class ErrorBody(BaseModel):
    """OpenAI's error shape: the body of every answer that is not a 200."""

    error: ErrorDetail


class ServedModel(openai.types.Model):
    version: str = Field(..., description="the registry version answering, as dolly@3")
    parent: str | None = Field(None, description="a LoRA adapter's: the served base model it runs on")
    decoding: Decoding = Field(
        ...,
        description="what a request to this model gets for the sampling parameters it leaves out (the chat page starts there)",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]


# Not blank, as a record's instruction and response must be. The schema says so; the check is the
# records' own (contract/records.py), which names the reason: "field 'response' is empty".
Text = Annotated[str, Field(json_schema_extra={"pattern": r"\S"})]


class Correction(BaseModel):
    """A better answer, written by the person who asked: saved for review as a Dolly record."""

    model_config = ConfigDict(extra="forbid")

    response: Text
    category: Literal[DOLLY_CATEGORIES] = Field(..., description="one of Dolly's eight categories")


class FeedbackRequest(BaseModel):
    """A rating of one answer, a better answer written for it, or both."""

    model_config = ConfigDict(
        extra="forbid",
        # The rule of _rated_or_corrected, as JSON Schema states it.
        json_schema_extra={
            "anyOf": [
                {"required": ["rating"], "properties": {"rating": {"enum": ["up", "down"]}}},
                {"required": ["correction"], "properties": {"correction": {"type": "object"}}},
            ]
        },
    )

    model: str = Field(..., min_length=1, max_length=200, description="the version that answered: the answer's `model`")
    answer_id: str | None = Field(None, max_length=100, description="the answer's `id`")
    instruction: Text = Field(..., description="what was asked: the prompt, or the chat's last user message")
    context: str = Field("", description="its context: the completion's `context`, or the chat folded before it")
    answer: str = Field("", description="what the model answered")
    rating: Literal["up", "down"] | None = None
    correction: Correction | None = None
    user: str | None = Field(None, max_length=200, description="who rated, when the page has a login")

    @model_validator(mode="after")
    def _rated_or_corrected(self) -> FeedbackRequest:
        if self.rating is None and self.correction is None:
            raise ValueError("send a rating ('up' or 'down'), a correction, or both")
        return self


class FeedbackSaved(BaseModel):
    id: int
    status: str = Field(..., description="what happens next")
