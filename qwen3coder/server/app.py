"""The FastAPI application: routes, authentication, request accounting and the web page.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /v1/models/{id}
    POST /tokenize   POST /detokenize   GET /health   GET /metrics   GET /  (web chat, static/)

Bodies are read by `read_json`, not by FastAPI's automatic parsing, so that every malformed body
(bad JSON, invalid UTF-8, too large, nested too deeply, not an object) gets a clear OpenAI-style 400.
`--api-key` protects `/v1/*`, `/tokenize` and `/detokenize` (`Authorization: Bearer KEY`);
`/health`, `/metrics` and the page stay open (the page asks for the key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from pathlib import Path
from typing import Any, AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen3coder.server.chat_handler import ChatCompletionHandler, render_prompt
from qwen3coder.server.completion_handler import CompletionHandler
from qwen3coder.server.errors import APIError, error_body, install_error_handlers
from qwen3coder.server.metrics import ServerMetrics
from qwen3coder.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeChatRequest, TokenizeCompletionRequest)
from qwen3coder.server.state import ServerState

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 32 << 20
MAX_JSON_DEPTH = 64
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
          "/metrics", "/"}
M = TypeVar("M", bound=BaseModel)


def _depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
    return depth


async def read_json(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}", 413)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", 413)
    if not raw.strip():
        raise APIError("request body is empty; send a JSON object", 400)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"request body is not valid UTF-8 (byte {e.start})", 400) from e
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", 400) from e
    except RecursionError as e:
        raise APIError(f"request body is nested too deeply (limit {MAX_JSON_DEPTH})", 400) from e
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}", 400)
    if _depth(body) > MAX_JSON_DEPTH:
        raise APIError(f"request body is nested too deeply (limit {MAX_JSON_DEPTH})", 400)
    return body


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        from fastapi.exceptions import RequestValidationError

        from qwen3coder.server.errors import validation_message

        message, param = validation_message(RequestValidationError(e.errors()))
        raise APIError(message, 400, param=param) from e


class AccessMiddleware:
    """API-key check for the API routes and per-route request counts for /metrics (pure ASGI, so
    streaming and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    def _authorized(self, scope: Scope) -> bool:
        key = self.state.api_key
        path = scope["path"]
        if not key or not (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else
                                             ("/static" if path.startswith("/static/") else "other"))
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                body = json.dumps(error_body("invalid or missing API key; send 'Authorization: Bearer KEY'",
                                             401, code="invalid_api_key")).encode()
                await send_wrapper({"type": "http.response.start", "status": 401,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"www-authenticate", b"Bearer"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            if self.state.metrics is not None:
                self.state.metrics.record_http(route, scope.get("method", ""), status[0])


def build_app(state: ServerState) -> FastAPI:
    """The ASGI app over `state` (its engine must already run)."""
    if state.metrics is None:
        state.metrics = ServerMetrics(state.engine, state.model_name)
    if not state.max_model_len:
        state.max_model_len = state.engine.engine.config.scheduler.max_model_len

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def drain_metrics() -> None:
            while True:
                await asyncio.sleep(5)
                state.metrics.drain()

        task = asyncio.create_task(drain_metrics())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="qwen3coder", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server_state = state
    install_error_handlers(app)
    chat = ChatCompletionHandler(state)
    completion = CompletionHandler(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat.create(parse(ChatCompletionRequest, await read_json(request)), request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion.create(parse(CompletionRequest, await read_json(request)), request)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "qwen3coder",
                "root": state.engine.engine.config.model_path or name, "parent": None,
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(n) for n in state.served_model_names]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        return JSONResponse(model_card(state.check_model(model_id)))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_json(request)
        tok = state.need_tokenizer("/tokenize")
        if "messages" in body:
            req = parse(TokenizeChatRequest, body)
            state.check_model(req.model)
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            text = render_prompt(state, [m.model_dump(exclude_none=True) for m in req.messages], tools,
                                 req.add_generation_prompt, req.chat_template_kwargs)
        else:
            req = parse(TokenizeCompletionRequest, body)
            state.check_model(req.model)
            text = req.prompt
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}
        if req.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse(DetokenizeRequest, await read_json(request))
        state.check_model(req.model)
        tok = state.need_tokenizer("/detokenize")
        limit = state.engine.engine.vocab_size
        bad = [t for t in req.tokens if t >= limit]
        if bad:
            raise APIError(f"tokens: ids {bad[:5]} are outside the vocabulary [0, {limit})", 400, param="tokens")
        return JSONResponse({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})

    @app.get("/health")
    async def health() -> Response:
        if state.engine.dead_error is not None:
            raise APIError(f"engine loop failed: {state.engine.dead_error!r}", 503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(AccessMiddleware, state=state)
    return app
