"""What every handler shares: the engine, tokenizer, chat template and server settings (`ServerState`),
plus the plumbing between an HTTP request and the engine.

* `ServerState.submit` queues one engine request and maps engine refusals onto API errors
  (`ValueError` → 400, `QueueFullError` → 503, a dead engine → 503).
* `run_until_disconnect` runs a non-streaming generation while watching the connection; if the
  client leaves, the generation is cancelled, which aborts the engine request (its KV blocks are
  freed at the engine's next step).
* `SSEResponse` streams server-sent events the same way: a disconnect cancels the body generator,
  whose `finally` aborts the engine request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen3coder.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError, RequestStream
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.server.errors import APIError

T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    served_model_names: list[str]
    chat_template: str | None = None
    api_key: str | None = None
    max_model_len: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Any = None  # server.metrics.ServerMetrics

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> str:
        """The served name to report; unknown names are a 404 as in OpenAI."""
        if model is None or model == "":
            return self.model_name
        if model not in self.served_model_names:
            raise APIError(f"the model `{model}` does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.served_model_names)}", 404, param="model",
                           code="model_not_found")
        return model

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise APIError(f"{what} needs a tokenizer, and this model was loaded without one "
                           "(use token-id prompts with /v1/completions)", 400)
        return self.tokenizer

    def need_chat_template(self) -> str:
        if not self.chat_template:
            raise APIError("this model has no chat template; use /v1/completions or restart the server "
                           "with --chat-template PATH", 400)
        return self.chat_template

    def check_prompt_len(self, n: int, param: str = "messages") -> None:
        if n >= self.max_model_len:
            raise APIError(f"this model's maximum context length is {self.max_model_len} tokens, but the "
                           f"prompt has {n} tokens (nothing left to generate)", 400, param=param,
                           code="context_length_exceeded")

    def sampling_params(self, overrides: dict[str, Any], max_tokens: int | None, prompt_len: int) -> SamplingParams:
        """Checkpoint defaults (generation_config.json) overridden by the request's fields."""
        base = self.engine.get_default_sampling_params()
        kwargs = {name: getattr(base, name) for name in ("temperature", "top_p", "top_k", "min_p",
                                                         "repetition_penalty")}
        kwargs.update(overrides)
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                           f"{prompt_len} tokens and max_tokens asks for {max_tokens} more (at most {room})",
                           400, param="max_tokens", code="context_length_exceeded")
        kwargs["max_tokens"] = max_tokens
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise APIError(str(e).replace("SamplingParams.", ""), 400) from e

    def submit(self, prompt: str | dict[str, Any], params: SamplingParams, request_id: str) -> RequestStream:
        try:
            return self.engine.add_request(request_id, prompt, params)
        except QueueFullError as e:
            raise APIError(f"the server is busy: {e}", 503, code="queue_full") from e
        except EngineDeadError as e:
            raise APIError(str(e), 503, code="engine_dead") from e
        except ValueError as e:
            msg = str(e)
            param = msg.split(":", 1)[0] if ":" in msg and " " not in msg.split(":", 1)[0] else None
            raise APIError(msg, 400, param=param) from e


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work()`; return None (after cancelling it) if the client disconnects first."""
    result: list[T] = []
    failure: list[Exception] = []

    async with anyio.create_task_group() as tg:
        async def _work() -> None:
            try:
                result.append(await work())
            except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
                failure.append(e)
            tg.cancel_scope.cancel()

        async def _watch() -> None:
            await _wait_for_disconnect(request.receive)
            tg.cancel_scope.cancel()

        tg.start_soon(_work)
        tg.start_soon(_watch)
    if failure:
        if isinstance(failure[0], EngineDeadError):
            raise APIError(str(failure[0]), 503, code="engine_dead") from failure[0]
        raise failure[0]
    return result[0] if result else None


async def collect_final(stream: RequestStream) -> Any:
    """The last output of a request (FINAL_ONLY or cumulative); aborts the request if cancelled."""
    last = None
    try:
        async for out in stream:
            last = out
    finally:
        stream.aclose_sync()
    return last


class SSEResponse(StreamingResponse):
    """`text/event-stream` whose body generator is cancelled and closed when the client disconnects."""

    def __init__(self, content: AsyncIterator[str], **kwargs: Any):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def _stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we were writing
                        pass
                    tg.cancel_scope.cancel()

                async def _watch() -> None:
                    await _wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(_stream)
                tg.start_soon(_watch)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                with anyio.CancelScope(shield=True):
                    await closer()


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive: yields (iterator index, item)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # noqa: BLE001 - hand the failure to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
