"""Every refusal in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with a
status that names the problem, and each status documented in /openapi.json. No failure is a
bare 500: FastAPI's own refusals and unexpected faults get the same shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.protocol import ErrorBody, ErrorDetail

logger = logging.getLogger("ray.serve")


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

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.status)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def documented(*statuses: int, answer: type[BaseModel] | None = None) -> dict:
    """A route's `responses`: its error statuses, and its 200 when it answers `answer`."""
    responses = {status: {**_ERRORS[status], "model": ErrorBody} for status in statuses}
    if answer is not None:  # a whole JSON answer, or with stream=true Server-Sent Events of its chunks
        responses[200] = {"model": answer, "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return responses


def answer_errors_in_openai_shape(api: FastAPI) -> None:
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


def _field(error: dict) -> str:
    """('body', 'messages', 1, 'content') -> 'messages.1.content'; a body that is not JSON -> 'body'."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(part) for part in error["loc"][1:]) or "body"
