"""The OpenAI-compatible HTTP API in front of the model replicas, as a Serve deployment.

It folds a request into a Dolly prompt that fits the context, has the model replicas generate it,
and relays their text as one JSON answer or as Server-Sent Events. Bad input is answered with
OpenAI's error shape and a status that names the problem: 400 for a prompt longer than the context
or a setting the engine lacks, 422 for max_tokens beyond the context, 503 with Retry-After when
the model replicas' queues are full.

A model replica lost while it works on a request (killed, out of memory, its node gone) costs the
client nothing: the request goes on on a live replica from the text that had come back
(services/failover.py). Only when every try is lost does it fail: 503 with Retry-After before
the status line has left, an error event in a begun stream (services/replies.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from contract.models import load_tokenizer
from services.auth import ApiKeys
from services.config import ServeConfig
from services.errors import ApiError
from services.failover import Failover, ReplicaLost
from services.feedback import FeedbackDesk
from services.metrics import IngressMetrics, RecordedAnswers
from services.prompts import PromptBuilder, PromptTooLong, context_limit
from services.protocol import ChatRequest, CompletionRequest
from services.replies import Reply
from services.routes import openai_api
from services.routing import ServedModels


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, folder: str, version: str, config: ServeConfig, base: str | None = None):
        """`version` answers requests for the served name; with `config.adapters`, `base` is the
        model they run on, and `version` its display name."""
        self._model = model
        self._config = config
        tokenizer = load_tokenizer(folder)
        self._prompts = PromptBuilder(tokenizer, context_limit(Path(folder), tokenizer, config.engine.max_context))
        self.keys = ApiKeys(config.auth)
        self.metrics = IngressMetrics()
        self.served = ServedModels(version, Path(folder), config, base)
        self.feedback = FeedbackDesk(config.feedback.database_url(), self.served, self.metrics)

    def __serve_build_asgi_app__(self) -> RecordedAnswers:
        return openai_api(self)

    async def answer(self, body: CompletionRequest | ChatRequest, resumed: int | None = None):
        chat = isinstance(body, ChatRequest)
        if resumed:  # the rest of a stream cut on its way (a lost ingress replica), asked for by ui/resume.py
            self.metrics.retried("stream_cut_resumed_by_client")
        adapter, version = self.served.route(body.model)
        if unsupported := body.unsupported_by(self._config.engine):
            setting, why = unsupported
            raise ApiError(400, why, setting)
        limit = self._prompts.context_limit
        if (body.requested_max_tokens or 0) >= limit:
            raise ApiError(422, f"max_tokens must be below the model's context of {limit} tokens", "max_tokens")
        defaults = self.served.defaults(version)
        max_tokens = body.requested_max_tokens or defaults.max_tokens
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
        params = body.sampling(defaults, prompt.max_tokens, self._config.min_tokens)
        reply = Reply(body, prompt, chat, version, limit, self._config.log_content)
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
