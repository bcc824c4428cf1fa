"""The API's paths: what each takes, its key check and the answers /openapi.json documents for it.
The table is the one list of endpoints: the answers counted by endpoint are those of its routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Header, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from openai.types import Completion
from openai.types.chat import ChatCompletion

from services.errors import ApiError, answer_errors_in_openai_shape, documented
from services.metrics import RecordedAnswers
from services.protocol import ChatRequest, CompletionRequest, FeedbackRequest, FeedbackSaved, ModelList

if TYPE_CHECKING:  # the deployment whose app this is; it builds the app at replica start
    from services.ingress import OpenAIIngress


def openai_api(server: OpenAIIngress) -> RecordedAnswers:
    api = FastAPI(title="dolly-ray", description="Dolly behind an OpenAI-compatible API")
    answer_errors_in_openai_shape(api)

    # Declared as HTTP bearer security, so that /openapi.json says how to authenticate; the check
    # itself is ours (auto_error=False), to answer in OpenAI's error shape.
    bearer = HTTPBearer(auto_error=False, description="an API key, one of auth.api_keys_file or DOLLY_API_KEYS")

    # A plain function: FastAPI cannot resolve a bound method's annotations.
    def authorized(request: Request, _=Depends(bearer)) -> None:
        if not server.keys.allows(request.headers.get("authorization")):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": server.served.version}

    @api.get("/v1/models", dependencies=[Depends(authorized)], response_model=ModelList, responses=documented(401, 500))
    async def models():
        return server.served.listing()

    answers = (400, 401, 404, 422, 500, 503)

    @api.post("/v1/completions", dependencies=[Depends(authorized)], responses=documented(*answers, answer=Completion))
    async def completions(body: CompletionRequest):
        return await server.answer(body)

    @api.post("/v1/chat/completions", dependencies=[Depends(authorized)], responses=documented(*answers, answer=ChatCompletion))
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
        responses=documented(400, 401, 404, 422, 500),
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
        return await server.feedback.save(body, idempotency_key)

    # FastAPI's own pages (/openapi.json, /docs) are plain routes, counted as "other".
    endpoints = {route.path for route in api.routes if isinstance(route, APIRoute)}
    return RecordedAnswers(api, server.metrics, endpoints)
