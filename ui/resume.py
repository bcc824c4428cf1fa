"""A streamed chat answer that survives losing the server replica streaming it.

The API goes on by itself when a model replica is lost (services/failover.py). The HTTP ingress
is another matter: a stream in flight on an ingress replica that dies is cut, and no proxy can
replay bytes a client has already read. So the client asks for the rest: the same conversation
with the text that came back as the start of the answer (a final assistant message, which the
API continues, as vLLM's `continue_final_message`), and what is left of max_tokens, known from
the usage every chunk carries (`stream_options.continuous_usage_stats`, vLLM's extension). A
greedy answer goes on as it would have; a sampled one as another sample from that point on.

The chunks are OpenAI's, with usage counted over the whole answer, so a caller reads one
uninterrupted stream. Only the failures of a lost replica are retried: a cut connection, a 5xx
that is not "overloaded", an error event mid-stream. A refusal or a timeout is raised at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
from openai.types.chat import ChatCompletionChunk


def lost_replica(error: openai.OpenAIError) -> bool:
    """Whether the failure is a lost server replica's, so that sending again can succeed."""
    if isinstance(error, openai.APITimeoutError):
        return False  # the answer is slower than the client's patience: again would be as slow
    if isinstance(error, openai.APIConnectionError):
        return True  # cut mid-stream, or the front restarting
    if isinstance(error, openai.APIStatusError):
        kind = error.body.get("type") if isinstance(error.body, dict) else None
        return error.status_code in (500, 502, 503, 504) and kind != "overloaded_error"
    # An error event mid-stream: the API's own "lost on every try, send the request again".
    return isinstance(error, openai.APIError) and isinstance(error.body, dict) and error.body.get("code") == 503


async def resumed_chat(
    client: openai.AsyncOpenAI,
    *,
    messages: list[dict],
    max_tokens: int,
    retries: int,
    retry_wait_s: float,
    **request,
) -> AsyncIterator[ChatCompletionChunk]:
    """The answer's chunks, asked for again from where it stopped at most `retries` times."""
    text, tokens, seen, prompt_tokens = "", 0, 0, None
    for attempt in range(retries + 1):
        begun = [{"role": "assistant", "content": text}] if text else []
        try:
            stream = await client.chat.completions.create(
                messages=messages + begun,
                max_tokens=max_tokens - tokens,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                **request,
            )
            async for chunk in stream:
                if chunk.usage is not None:  # as one answer to the first request: its prompt, every token
                    prompt_tokens = prompt_tokens or chunk.usage.prompt_tokens
                    seen = tokens + chunk.usage.completion_tokens
                    chunk.usage.prompt_tokens, chunk.usage.completion_tokens = prompt_tokens, seen
                    chunk.usage.total_tokens = prompt_tokens + seen
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                yield chunk
            return
        except openai.OpenAIError as e:
            if attempt == retries or not lost_replica(e):
                raise
        tokens = seen
        if tokens >= max_tokens:  # lost just as the budget ran out: the answer is whole
            return
        await asyncio.sleep(retry_wait_s)
