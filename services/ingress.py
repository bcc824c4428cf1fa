"""The OpenAI-compatible HTTP API in front of the model replicas.

It authenticates, validates, folds the request into a Dolly prompt that fits the context, and
relays the model's text as one JSON answer or as Server-Sent Events. Bad input is answered with
OpenAI's error shape and a status that names the problem: 401 without a valid key, 422 for a
malformed body (naming the field), 400 for a prompt longer than the context, 503 with
Retry-After when the model replicas' queues are full. `POST /v1/feedback` keeps the chat page's
ratings and better answers (contract/feedback.py), once per Idempotency-Key, so that a retry of a
request whose answer was lost stores nothing twice.

With `adapters`, the request's `model` picks a LoRA adapter on the served base (NAME, NAME@latest or
NAME@N); `/v1/models` lists the base and every adapter, and a name that is neither gets 404 naming
those there are (services/adapters.py).

A model replica lost while it works on a request (killed, out of memory, its node gone) costs the
client nothing: the request goes on on a live replica from the text that had come back
(services/failover.py). Only when every try is lost does it fail: 503 with Retry-After before
the status line has left, an error event in a begun stream, as OpenAI's clients expect of a
transient failure. No failure is a bare 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract import registry
from contract.errors import UserError
from contract.feedback import FeedbackStore, KeyReused
from contract.models import load_tokenizer
from contract.records import RecordError
from services.auth import ApiKeys
from services.config import CONTINUOUS_LACKS, ServeConfig
from services.failover import Failover, ReplicaLost
from services.metrics import IngressMetrics
from services.prompts import Prompt, PromptBuilder, PromptTooLong, context_limit
from services.protocol import (
    ChatRequest,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    FeedbackRequest,
    FeedbackSaved,
    ModelList,
    StreamOptions,
)

logger = logging.getLogger("ray.serve")

ENDPOINTS = ("/healthz", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/feedback")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        body = ErrorBody(error=ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.status))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


# Every status the API answers besides 200, for /openapi.json: generated clients and gateways
# read their errors from here.
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before sending again", "schema": {"type": "integer"}}}
_ERRORS = {
    400: {"description": "the request cannot be served as asked: a prompt longer than the context, a setting this engine lacks"},
    401: {
        "description": "missing or wrong API key",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    },
    404: {"description": "the model named is not served here"},
    422: {"description": "a malformed body: `param` names the field"},
    500: {"description": "a fault of the server's own; its log has the details"},
    503: {"description": "every model replica is busy, or the one answering was lost: send again", "headers": _RETRY_AFTER},
}


def _documented(*statuses: int, answer: type[BaseModel] | None = None) -> dict:
    responses = {status: {**_ERRORS[status], "model": ErrorBody} for status in statuses}
    if answer is not None:  # a whole JSON answer, or with stream=true Server-Sent Events of its chunks
        responses[200] = {"model": answer, "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return responses


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, folder: str, version: str, config: ServeConfig, base: str | None = None):
        """`version` answers requests for the served name; with `config.adapters`, `base` is the
        model they run on, and `version` its display name."""
        self._model = model
        self.version = version
        self.served_name = config.served_model_name or version.split("@")[0]
        self._names = {self.served_name, version}
        self._config = config
        self._base = base
        self._on_base: set[str] = set()  # adapter versions checked to be on the base (versions never change)
        tokenizer = load_tokenizer(folder)
        self._prompts = PromptBuilder(tokenizer, context_limit(Path(folder), tokenizer, config.engine.max_context))
        self._keys = ApiKeys(config.auth)
        self.metrics = IngressMetrics()
        self._feedback = FeedbackStore(config.feedback.database_url())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return openai_api(self)

    def authorize(self, request: Request) -> None:
        if not self._keys.allows(request.headers.get("authorization")):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def models(self) -> dict:
        served = [{"id": self.served_name, "object": "model", "created": 0, "owned_by": "dolly-ray", "version": self.version}]
        for name in self._config.adapters:
            if registry.versions(name, self._config.registry):
                version = f"{name}@{registry.latest(name, self._config.registry)}"
                served.append({**served[0], "id": name, "version": version, "parent": self.served_name})
        return {"object": "list", "data": served}

    def _served_ids(self) -> str:
        adapters = ", ".join(self._config.adapters)
        return repr(self.served_name) + (f" and the adapters {adapters} (as NAME, NAME@latest or NAME@N)" if adapters else "")

    def _target(self, requested: str) -> tuple[str, str]:
        """(the multiplexed model id, the version that answers) for a request's `model`; the id is
        "" for the served model itself."""
        if requested in self._names:
            return "", self.version
        name, _, number = requested.partition("@")
        if name not in self._config.adapters:
            raise ApiError(
                404, f"model {requested!r} is not served here; these are: {self._served_ids()}", "model", kind="not_found_error"
            )
        try:
            folder, version = registry.resolve(f"{name}@{number or 'latest'}", self._config.registry)
        except UserError as e:
            raise ApiError(404, str(e), "model", kind="not_found_error") from None
        if version not in self._on_base:
            try:
                registry.check_base(folder, version, self._base)
            except UserError as e:
                raise ApiError(400, str(e), "model") from None
            self._on_base.add(version)
        return version, version

    async def feedback(self, body: FeedbackRequest, request_key: str | None = None) -> FeedbackSaved:
        # An earlier version may have answered (NAME@N); any other name is not ours to record, and
        # would grow the metric's labels without bound.
        names = [self.version.split("@")[0], *self._config.adapters]
        if body.model not in self._names | set(self._config.adapters) and not re.fullmatch(
            rf"({'|'.join(map(re.escape, names))})@\d+", body.model
        ):
            raise ApiError(
                404,
                f"model {body.model!r} is not served here: send the answer's `model` "
                f"({' or '.join(f'{name}@N' for name in names)}), or {self._served_ids()}",
                "model",
                kind="not_found_error",
            )
        correction = body.correction
        item = dict(
            model=body.model,
            answer_id=body.answer_id,
            instruction=body.instruction,
            context=body.context,
            answer=body.answer,
            rating=body.rating,
            response=correction and correction.response,
            category=correction and correction.category,
            user=body.user,
        )
        try:
            if request_key is None:
                saved, first = await asyncio.to_thread(self._feedback.add, **item), True
            else:
                saved, first = await asyncio.to_thread(self._feedback.add_once, request_key, **item)
        except RecordError as e:  # what the preparation pipeline would reject: the same reason
            field = {"response": "correction.response", "category": "correction.category"}.get(e.field, e.field)
            raise ApiError(422, f"{e.detail} ({e.reason.value}): this record could not train a model", field) from None
        except KeyReused as e:  # as the IETF's Idempotency-Key draft answers a key reused for another body
            raise ApiError(422, str(e), "Idempotency-Key") from None
        if first:
            self.metrics.rated(body.rating, correction is not None, body.model)
        return FeedbackSaved(id=saved, status="saved for review" if correction else "rating saved")

    async def answer(self, body: CompletionRequest | ChatRequest, resumed: int | None = None):
        chat = isinstance(body, ChatRequest)
        if resumed:  # the rest of a stream cut on its way (a lost ingress replica), asked for by ui/resume.py
            self.metrics.retried("stream_cut_resumed_by_client")
        adapter, version = self._target(body.model)
        if body.seed is not None and self._config.engine.batching == "continuous":
            raise ApiError(
                400, "seed needs engine.batching=dynamic: continuous batching has one random stream for all requests", "seed"
            )
        for setting, lacking in CONTINUOUS_LACKS.items():
            if getattr(body, setting) and self._config.engine.batching == "continuous":
                raise ApiError(
                    400, f"{setting} needs engine.batching=dynamic: transformers' continuous batching has {lacking}", setting
                )
        if body.top_k and not self._config.engine.has_top_k:
            raise ApiError(
                400,
                "top_k needs engine.continuous_top_k=true: this server's continuous batching runs without top-k, "
                "which would sort the whole vocabulary for every request",
                "top_k",
            )
        limit = self._prompts.context_limit
        if (body.requested_max_tokens or 0) >= limit:
            raise ApiError(422, f"max_tokens must be below the model's context of {limit} tokens", "max_tokens")
        max_tokens = body.requested_max_tokens or self._config.defaults.max_tokens
        if (body.min_tokens or 0) > max_tokens:
            raise ApiError(422, f"min_tokens ({body.min_tokens}) is above max_tokens ({max_tokens})", "min_tokens")
        try:
            prompt = (
                self._prompts.chat(body.messages, max_tokens)
                if chat
                else self._prompts.completion(body.prompt, body.context, max_tokens)
            )
        except PromptTooLong as e:
            raise ApiError(400, str(e), "messages" if chat else "prompt") from None
        # A whole answer needs no intermediate events: only the first, which shows the request was admitted.
        interval_s = self._config.engine.stream_interval_s if body.stream else math.inf
        params = body.sampling(self._config.defaults, prompt.max_tokens, self._config.min_tokens)
        reply = _Reply(body, prompt, chat, version, limit, self._config.log_content)
        events = Failover(
            self._model.options(multiplexed_model_id=adapter) if adapter else self._model,
            self._prompts.tokenize,
            prompt.ids,
            params,
            interval_s,
            self._config.deployment.lost_replica_retries,
            self.metrics,
            reply.id,
        )
        retry_after = str(self._config.deployment.retry_after_s)
        try:
            first = await events.__anext__()
            if body.stream:  # from here on, the stream is the client's: sse() ends it
                stream = reply.sse(first, events, retry_after)
                return StreamingResponse(stream, media_type="text/event-stream", headers=reply.headers)
            return JSONResponse(await reply.whole(first, events), headers=reply.headers)
        except BackPressureError:
            self.metrics.failed("overloaded")
            raise ApiError(
                503,
                f"all model replicas are busy: retry in {retry_after} s",
                kind="overloaded_error",
                headers={"Retry-After": retry_after},
            ) from None
        except ReplicaLost as e:
            raise ApiError(
                503, f"{e}: retry in {retry_after} s", kind="service_unavailable_error", headers={"Retry-After": retry_after}
            ) from None


class _Reply:
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
                    yield _sse({"error": {"message": message, "type": "service_unavailable_error", "param": None, "code": 503}})
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


def _field(error: dict) -> str:
    """('body', 'messages', 1, 'content') -> 'messages.1.content'; a body that is not JSON -> 'body'."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(part) for part in error["loc"][1:]) or "body"


def openai_api(server: OpenAIIngress) -> FastAPI:
    api = FastAPI(title="dolly-ray", description="Dolly behind an OpenAI-compatible API")

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        # FastAPI's own refusals (a body it cannot parse, an unknown path or method) in OpenAI's error shape.
        param = "body" if error.status_code == 400 else None
        return ApiError(error.status_code, str(error.detail), param, headers=error.headers).response()

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        logger.exception("unexpected error answering %s", request.url.path)
        message = f"internal error ({error.__class__.__name__}); the server's log has the details"
        return ApiError(500, message, kind="server_error").response()

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        fields = [_field(p) for p in problems]
        message = "; ".join(f"{f}: {p['msg']}" for f, p in zip(fields, problems))
        return ApiError(422, message, fields[0] if fields else None).response()

    # Declared as HTTP bearer security, so that /openapi.json says how to authenticate; the check
    # itself is ours (auto_error=False), to answer in OpenAI's error shape.
    bearer = HTTPBearer(auto_error=False, description="an API key, one of auth.api_keys_file or DOLLY_API_KEYS")

    # A plain function: FastAPI cannot resolve a bound method's annotations.
    def authorized(request: Request, _=Depends(bearer)) -> None:
        server.authorize(request)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": server.version}

    @api.get("/v1/models", dependencies=[Depends(authorized)], response_model=ModelList, responses=_documented(401, 500))
    async def models():
        return server.models()

    answers = (400, 401, 404, 422, 500, 503)

    @api.post("/v1/completions", dependencies=[Depends(authorized)], responses=_documented(*answers, answer=Completion))
    async def completions(body: CompletionRequest):
        return await server.answer(body)

    @api.post("/v1/chat/completions", dependencies=[Depends(authorized)], responses=_documented(*answers, answer=ChatCompletion))
    async def chat_completions(
        body: ChatRequest,
        # int, not int | None: a header is never JSON null, and the schema must not say it may be.
        resumed: int = Header(
            None,
            alias="X-Dolly-Resumed",
            ge=1,
            description="sent by a client asking for the rest of a stream that was cut (ui/resume.py): "
            "which request for the rest this is; counted in dolly_retried_requests",
        ),
    ):
        return await server.answer(body, resumed)

    @api.post(
        "/v1/feedback",
        dependencies=[Depends(authorized)],
        status_code=201,
        response_model=FeedbackSaved,
        responses=_documented(400, 401, 404, 422, 500),
    )
    async def feedback(
        body: FeedbackRequest,
        idempotency_key: str | None = Header(
            None,
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="any unique string: the same request sent again with it (a retry after a lost answer) "
            "is stored once and answered alike",
        ),
    ):
        return await server.feedback(body, idempotency_key)

    return _Recorded(api, server.metrics)


class _Recorded:
    """Counts every answer by endpoint and status code, and times it to its last byte; a client
    that leaves before the end is counted as 499, as nginx does."""

    def __init__(self, app, metrics: IngressMetrics):
        self._app, self._metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, recording_send)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            path = scope["path"].removeprefix(scope.get("root_path", ""))  # under a route_prefix
            endpoint = path if path in ENDPOINTS else "other"
            self._metrics.answered(endpoint, status, time.perf_counter() - started)
