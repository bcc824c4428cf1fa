"""A streamed chat answer that survives losing the server replica streaming it, for any client
built on the official openai SDK: `openai.AsyncOpenAI(http_client=resuming_http_client())`.

The API goes on by itself when a model replica is lost (services/failover.py). The HTTP ingress
is another matter: a stream in flight on an ingress replica that dies is cut, and no proxy can
replay bytes a client has already read. So the client asks for the rest: the same conversation
with the text that came back as the start of the answer (a final assistant message, which the
API continues, as vLLM's `continue_final_message`), and what is left of the answer's max_tokens,
known from the usage every chunk carries (`stream_options.continuous_usage_stats`, vLLM's
extension). A greedy answer goes on as it would have; a sampled one as another sample from there.

It is an httpx transport under the SDK, rather than a wrapper over it, so that every caller of
`chat.completions.create(stream=True)` gets it unchanged: the SDK reads one uninterrupted stream,
with usage counted over the whole answer and only as much usage as was asked for. A request that
fails before its stream begins is the SDK's to retry (its max_retries); only a begun stream is
resumed here, when it is cut, or ends with the API's error event for an answer lost mid-way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator

import httpx2

DONE = b"data: [DONE]\n\n"
logger = logging.getLogger(__name__)


class _Lost(Exception):
    """The API's error event for an answer lost mid-way, or the error of a request for the rest
    (`final`: a refusal, which asking again would not change)."""

    def __init__(self, event: dict, final: bool = False, wait_s: float = 0.0):
        self.event, self.final, self.wait_s = event, final, wait_s


class Answer:
    """One streamed chat answer over however many requests it takes: what to ask for next, and
    what the caller reads of each event that comes back."""

    def __init__(self, body: dict):
        self._body = body
        asked = body.get("stream_options") or {}
        self._usage_asked = bool(asked.get("include_usage"))
        self._running_asked = self._usage_asked and bool(asked.get("continuous_usage_stats"))
        self.budget: int | None = body.get("max_completion_tokens") or body.get("max_tokens")
        self.text, self.seen, self.requests, self.finished = "", 0, 0, False
        self._before = 0  # tokens that came back before the current request
        self._prompt_tokens: int | None = None
        self._last: dict | None = None

    def request(self) -> dict:
        """The next request's body: the first as asked, each later one for the rest."""
        self._before, self.requests = self.seen, self.requests + 1
        body = {k: v for k, v in self._body.items() if k not in ("max_tokens", "max_completion_tokens")}
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.text:
            body["messages"] = [*body["messages"], {"role": "assistant", "content": self.text}]
        if self.budget is not None:
            body["max_tokens"] = self.budget - self._before
        return body

    @property
    def spent(self) -> bool:
        """Cut just as the budget ran out: the answer is whole but for its ending."""
        return self.budget is not None and self.seen >= self.budget

    def read(self, event: dict) -> dict | None:
        """What the caller reads of one event of the current request (None: nothing)."""
        if "error" in event:
            raise _Lost(event)
        if self.budget is None:  # the first chunk names the budget the server gave the answer
            self.budget = (event.get("dolly") or {}).get("max_tokens")
        if usage := event.get("usage"):  # as one answer to the first request: its prompt, every token
            self._prompt_tokens = self._prompt_tokens or usage["prompt_tokens"]
            self.seen = self._before + usage["completion_tokens"]
            usage.update(prompt_tokens=self._prompt_tokens, completion_tokens=self.seen)
            usage["total_tokens"] = self._prompt_tokens + self.seen
        if not event.get("choices"):  # the closing usage chunk
            return event if self._usage_asked else None
        delta = event["choices"][0]["delta"]
        if self.requests > 1 and delta.get("role") and not delta.get("content"):
            return None  # the rest's opening chunk: the caller's answer opened already
        self.text += delta.get("content") or ""
        self.finished = self.finished or bool(event["choices"][0].get("finish_reason"))
        if not self._running_asked:
            event.pop("usage", None)
        self._last = event
        return event

    def ending(self) -> list[dict]:
        """The chunks that end an answer whose budget ran out as its stream was cut."""
        last = self._last or {}
        finish = {**last, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        finish.pop("usage", None)
        usage = {"prompt_tokens": self._prompt_tokens or 0, "completion_tokens": self.seen}
        usage["total_tokens"] = usage["prompt_tokens"] + self.seen
        return [finish] + ([{**finish, "choices": [], "usage": usage}] if self._usage_asked else [])


class _Resumption:
    """What to do as the requests for one streamed answer come back; the I/O is the transports'
    (the sync one and the async one), the decisions are made once, here."""

    def __init__(self, request: httpx2.Request, body: dict, retries: int, retry_wait_s: float):
        self.answer, self.done = Answer(body), False
        self._request, self._retries, self._wait_s, self._tries = request, retries, retry_wait_s, 0
        self._buffer = b""

    def request(self) -> httpx2.Request:
        """The next request: the first as asked, later ones for the rest; plain bytes back, as the
        stream is read event by event."""
        headers = {k: v for k, v in self._request.headers.items() if k.lower() not in ("content-length", "accept-encoding")}
        body = self.answer.request()
        # The server counts the requests for the rest (dolly_retried_requests): a lost ingress's toll.
        resumed = {"x-dolly-resumed": str(self.answer.requests - 1)} if self.answer.requests > 1 else {}
        return httpx2.Request(
            "POST",
            self._request.url,
            headers=headers | {"accept-encoding": "identity"} | resumed,
            json=body,
            extensions=self._request.extensions,
        )

    def read(self, raw: bytes) -> Iterator[bytes]:
        """What the caller reads of the bytes that came back; `done` once the answer is whole."""
        self._buffer += raw.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer and not self.done:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            data = b"\n".join(line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:"))
            if data == b"[DONE]":
                self.done = True
                yield DONE
            elif data and (event := self.answer.read(json.loads(data))) is not None:
                yield _sse(event)

    def ended(self) -> None:
        """The stream closed before [DONE]: cut, unless the answer had finished."""
        if not self.answer.finished:
            raise httpx2.RemoteProtocolError("the stream closed mid-answer")

    def refused(self, response: httpx2.Response) -> _Lost:
        """The failure of a request for the rest that was answered, but not with a stream."""
        try:
            error = json.loads(response.content)["error"]
        except (ValueError, KeyError, TypeError):
            text = response.content.decode(errors="replace")[:200]
            error = {"message": f"HTTP {response.status_code}: {text}", "type": "server_error", "param": None}
        event = {"error": {**error, "code": error.get("code") or response.status_code}}
        return _Lost(event, final=response.status_code < 500, wait_s=_seconds(response.headers.get("retry-after")))

    def after(self, failure: Exception) -> bytes | float:
        """After a cut stream or a failed request for the rest: the bytes that end the answer
        here, or the seconds to wait before asking for the rest. A cut it cannot mend is raised."""
        self._buffer = b""
        if self.answer.spent:
            return b"".join(_sse(event) for event in self.answer.ending()) + DONE
        if isinstance(failure, _Lost) and (failure.final or self._tries == self._retries):
            return _sse(failure.event)  # the SDK raises it, as the server's own error
        if self._tries == self._retries:
            raise failure
        self._tries += 1
        cause = failure.event["error"]["message"] if isinstance(failure, _Lost) else repr(failure)
        logger.info(
            "answer cut after %d tokens (%s): asking for the rest, %d of %d", self.answer.seen, cause, self._tries, self._retries
        )
        return max(self._wait_s, failure.wait_s if isinstance(failure, _Lost) else 0.0)


class ResumingTransport(httpx2.AsyncBaseTransport):
    """Sends requests through `transport`; a streamed chat answer cut mid-way is asked for again
    from where it stopped, at most `retries` times, `retry_wait_s` apart (or as long as the
    server's Retry-After says). A read timeout is raised: asking again would be as slow."""

    def __init__(self, retries: int = 2, retry_wait_s: float = 1.0, transport: httpx2.AsyncBaseTransport | None = None):
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self._transport = transport or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = _streamed_chat(request)
        if body is None:
            return await self._transport.handle_async_request(request)
        resumption = _Resumption(request, body, self.retries, self.retry_wait_s)
        response = await self._transport.handle_async_request(resumption.request())
        if response.status_code != 200:  # not begun: the SDK's own retries judge it
            return response
        stream = _AsyncParts(self._resumed(resumption, response))
        return httpx2.Response(200, headers=response.headers, stream=stream, extensions=response.extensions)

    async def _resumed(self, resumption: _Resumption, response: httpx2.Response | None) -> AsyncIterator[bytes]:
        while True:
            if response is not None:
                try:
                    async for raw in response.stream:
                        for part in resumption.read(raw):
                            yield part
                        if resumption.done:
                            return
                    resumption.ended()
                    return
                except httpx2.TimeoutException:
                    raise
                except (httpx2.TransportError, _Lost) as e:
                    failure = e
                finally:
                    await response.aclose()
            step, response = resumption.after(failure), None
            if isinstance(step, bytes):
                yield step
                return
            await asyncio.sleep(step)
            try:
                sent = await self._transport.handle_async_request(resumption.request())
            except httpx2.TimeoutException:
                raise
            except httpx2.TransportError as e:  # the front still restarting
                failure = e
                continue
            if sent.status_code == 200:
                response = sent
            else:
                await sent.aread()
                failure = resumption.refused(sent)
                await sent.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


class SyncResumingTransport(httpx2.BaseTransport):
    """ResumingTransport for the SDK's sync client, `openai.OpenAI`: the same loop over blocking
    I/O (as httpx itself pairs its clients), every decision in it _Resumption's."""

    def __init__(self, retries: int = 2, retry_wait_s: float = 1.0, transport: httpx2.BaseTransport | None = None):
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self._transport = transport or httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = _streamed_chat(request)
        if body is None:
            return self._transport.handle_request(request)
        resumption = _Resumption(request, body, self.retries, self.retry_wait_s)
        response = self._transport.handle_request(resumption.request())
        if response.status_code != 200:
            return response
        stream = _SyncParts(self._resumed(resumption, response))
        return httpx2.Response(200, headers=response.headers, stream=stream, extensions=response.extensions)

    def _resumed(self, resumption: _Resumption, response: httpx2.Response | None) -> Iterator[bytes]:
        while True:
            if response is not None:
                try:
                    for raw in response.stream:
                        yield from resumption.read(raw)
                        if resumption.done:
                            return
                    resumption.ended()
                    return
                except httpx2.TimeoutException:
                    raise
                except (httpx2.TransportError, _Lost) as e:
                    failure = e
                finally:
                    response.close()
            step, response = resumption.after(failure), None
            if isinstance(step, bytes):
                yield step
                return
            time.sleep(step)
            try:
                sent = self._transport.handle_request(resumption.request())
            except httpx2.TimeoutException:
                raise
            except httpx2.TransportError as e:
                failure = e
                continue
            if sent.status_code == 200:
                response = sent
            else:
                sent.read()
                failure = resumption.refused(sent)
                sent.close()

    def close(self) -> None:
        self._transport.close()


class _AsyncParts(httpx2.AsyncByteStream):
    """The bytes of one answer however many requests it took; closing it closes the one open."""

    def __init__(self, parts: AsyncGenerator[bytes]):
        self._parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._parts:
            yield part

    async def aclose(self) -> None:
        await self._parts.aclose()


class _SyncParts(httpx2.SyncByteStream):
    def __init__(self, parts: Generator[bytes]):
        self._parts = parts

    def __iter__(self) -> Iterator[bytes]:
        yield from self._parts

    def close(self) -> None:
        self._parts.close()


def resuming_http_client(retries: int = 2, retry_wait_s: float = 1.0, **options) -> httpx2.AsyncClient:
    """The openai SDK's own async HTTP client (its timeouts and limits; `options` pass through to
    it), whose streamed chat answers survive a lost server replica: for `openai.AsyncOpenAI`."""
    import openai  # the SDK's defaults, and only where they are asked for

    return openai.DefaultAsyncHttpxClient(transport=ResumingTransport(retries, retry_wait_s), **options)


def resuming_sync_http_client(retries: int = 2, retry_wait_s: float = 1.0, **options) -> httpx2.Client:
    """The same for `openai.OpenAI`."""
    import openai

    return openai.DefaultHttpxClient(transport=SyncResumingTransport(retries, retry_wait_s), **options)


def _streamed_chat(request: httpx2.Request) -> dict | None:
    if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
        return None
    try:
        body = json.loads(request.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) and body.get("stream") and isinstance(body.get("messages"), list) else None


def _seconds(retry_after: str | None) -> float:
    try:
        return float(retry_after or 0)
    except ValueError:  # an HTTP date: the usual pause will do
        return 0.0


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"
