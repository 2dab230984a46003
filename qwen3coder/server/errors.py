"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type", "param", "code"}}`.

`APIError` is raised by the handlers; `install_error_handlers(app)` maps it, FastAPI's request
validation errors (normally 422, here 400 as OpenAI does), Starlette's 404/405, JSON decoding
errors and any unexpected exception (500, logged) onto that body. The `type` values follow
OpenAI/vLLM: `invalid_request_error`, `authentication_error`, `not_found_error`,
`method_not_allowed`, `service_unavailable`, `internal_server_error`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("qwen3coder.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "method_not_allowed", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client with `status` and an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               err_type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.status, err.param, err.code, err.err_type),
                        status_code=err.status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content")` -> `messages[0].content`, skipping pydantic's union tags."""
    out = ""
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p[:1].isupper()):
            continue  # a union member's name ("str", "list[str]", "function-after[...]", a model class)
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None

    def text(err: dict[str, Any]) -> str:
        msg = str(err.get("msg", "invalid value"))
        return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg

    same = [e for e in errors if _loc_to_param(tuple(e.get("loc", ()))) == param]
    if len(same) > 1:  # the alternatives of a union: list what each would have needed
        msgs = list(dict.fromkeys(text(e) for e in same))
        body = "; or ".join(msgs)
    else:
        body = text(first)
    message = f"{param}: {body}" if param else body
    rest = len(errors) - len(same)
    if rest > 0:
        message += f" (and {rest} more problem{'s' if rest > 1 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(message, 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"route {request.method} {request.url.path} not found"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(APIError(message, exc.status_code), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", 500))
