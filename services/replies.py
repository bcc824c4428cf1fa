"""One answer in OpenAI's completion or chat shape: a whole JSON body, or Server-Sent Events of its
chunks. A client that leaves mid-answer cancels its generation in the model replica; a model
replica lost on every try ends a begun stream with an error event, as OpenAI's clients expect of a
transient failure (the status line has left)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from services.errors import ApiError
from services.failover import ReplicaLost
from services.prompts import Prompt
from services.protocol import ChatRequest, CompletionRequest, StreamOptions

logger = logging.getLogger("ray.serve")


class Reply:
    """One answer, in OpenAI's completion or chat shape."""

    def __init__(
        self,
        body: CompletionRequest | ChatRequest,
        prompt: Prompt,
        chat: bool,
        version: str,
        context_limit: int,
        log_content: bool,
    ):
        self._body, self._prompt, self._chat = body, prompt, chat
        self.version, self._context_limit, self._log_content = version, context_limit, log_content
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self._created = int(time.time())
        self._started = time.perf_counter()
        self._object = ("chat.completion.chunk" if body.stream else "chat.completion") if chat else "text_completion"
        self.headers = {"X-Dolly-Trimmed-Turns": str(prompt.trimmed_turns)}

    @property
    def _meta(self) -> dict:
        # max_tokens: the budget the answer runs under, so that a client resuming a cut stream
        # (ui/resume.py) knows what is left of it when the request named none.
        return {
            "model_version": self.version,
            "trimmed_turns": self._prompt.trimmed_turns,
            "context_limit": self._context_limit,
            "max_tokens": self._prompt.max_tokens,
        }

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = len(self._prompt.ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _envelope(self, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": self._object,
            "created": self._created,
            "model": self.version,
            "choices": choices,
            **extra,
        }

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if not self._chat:
            return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        if not self._body.stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    async def whole(self, first: dict, events) -> dict:
        parts, event = [], first
        async with _cancelled_unless_done(events):
            while True:
                parts.append(event.get("text", ""))
                if "finish_reason" in event:
                    break
                event = await events.__anext__()
        text = "".join(parts)
        self._log(text, event)
        return self._envelope(
            [self._choice(text, event["finish_reason"])], usage=self._usage(event["completion_tokens"]), dolly=self._meta
        )

    async def sse(self, first: dict, events, retry_after: str) -> AsyncIterator[str]:
        parts, event = [], first
        options = self._body.stream_options or StreamOptions()
        running = options.include_usage and options.continuous_usage_stats

        def so_far(event: dict) -> dict:
            return {"usage": self._usage(event["completion_tokens"])} if running else {}

        async with _cancelled_unless_done(events):
            yield _sse(self._envelope([self._choice("", None, first=True)], dolly=self._meta, **so_far({"completion_tokens": 0})))
            while True:
                if event.get("text"):
                    parts.append(event["text"])
                    yield _sse(self._envelope([self._choice(event["text"], None)], **so_far(event)))
                if "finish_reason" in event:
                    break
                try:
                    event = await events.__anext__()
                except ReplicaLost as e:
                    # The status line has left: the stream ends with an error event, which OpenAI's clients raise.
                    message = f"{e}, mid-answer: send the request again in {retry_after} s"
                    yield _sse(ApiError(503, message, kind="service_unavailable_error").body())
                    return
        yield _sse(self._envelope([self._choice(None, event["finish_reason"])], **so_far(event)))
        if options.include_usage:
            yield _sse(self._envelope([], usage=self._usage(event["completion_tokens"])))
        yield "data: [DONE]\n\n"
        self._log("".join(parts), event)

    def _log(self, text: str, end: dict) -> None:
        seconds = time.perf_counter() - self._started
        content = (
            f" prompt={self._body.model_dump_json(include={'prompt', 'context', 'messages'})} answer={text!r}"
            if self._log_content
            else ""
        )
        logger.info(
            "%s %s prompt_tokens=%d completion_tokens=%d trimmed_turns=%d finish=%s %.3fs%s",
            self.id,
            self.version,
            len(self._prompt.ids),
            end["completion_tokens"],
            self._prompt.trimmed_turns,
            end["finish_reason"],
            seconds,
            content,
        )


@contextlib.asynccontextmanager
async def _cancelled_unless_done(events):
    """A client that leaves mid-answer cancels the generation in the model replica."""
    done = False
    try:
        yield
        done = True
    finally:
        if not done:
            events.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
