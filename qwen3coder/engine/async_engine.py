"""`AsyncLLMEngine`: the engine behind the OpenAI-compatible server.

The `LLMEngine` runs in a background thread, so model compute never blocks the asyncio event loop.
`add_request` validates at call time (`ValueError` naming the field, `QueueFullError` when too many
requests wait) and returns an async iterator of `RequestOutput`s (cumulative, delta or final-only,
per `SamplingParams.output_kind`); leaving the iteration early aborts the request. `abort` may be
called at any time. `get_stats` feeds /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from dataclasses import replace
from typing import Any, AsyncIterator

from qwen3coder.engine.llm_engine import LLMEngine, PromptType
from qwen3coder.engine.metrics import EngineStats
from qwen3coder.engine.outputs import RequestOutput
from qwen3coder.engine.sampling_params import SamplingParams

logger = logging.getLogger("qwen3coder.engine")

_END = object()


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 429/503)."""


class EngineDeadError(RuntimeError):
    """The engine loop failed and cannot serve requests any more."""


class RequestStream:
    """Async iterator over one request's outputs, fed from the engine thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, engine: "AsyncLLMEngine"):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self.finished = False

    def put(self, item: Any) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self.aclose_sync()
            raise
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def aclose_sync(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.aclose_sync()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None):
        self.engine = engine
        if max_waiting_requests is None:
            max_waiting_requests = engine.config.scheduler.max_waiting_requests
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._active: set[str] = set()  # request ids not yet finished (guarded by _lock)
        self._num_pending = 0  # added but not yet handed to the scheduler
        self._stats = engine.get_stats()
        self._observations: tuple[list[float], list[float], list[float]] = ([], [], [])
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen3coder-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: Any = None, max_waiting_requests: int | None = None,
                        **kwargs: Any) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_pretrained(model, **kwargs), max_waiting_requests)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.get_default_sampling_params()

    # ------------------------------------------------------------------ API (event loop side)
    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None) -> RequestStream:
        """Validate and queue a request; iterate the returned stream for its outputs."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop failed: {self.dead_error!r}")
        if self._stopped:
            raise EngineDeadError("engine is shut down")
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._active:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            waiting = self._num_pending + self._stats.num_waiting
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise QueueFullError(f"{waiting} requests are waiting (max_waiting_requests="
                                     f"{self.max_waiting_requests}); retry later")
        req = self.engine.make_request(request_id, prompt, params)
        stream = RequestStream(request_id, loop, self)
        with self._lock:
            if request_id in self._active:
                raise ValueError(f"request_id: {request_id!r} is already in use")
            self._active.add(request_id)
            self._num_pending += 1
        self._commands.put(("add", req, stream))
        self._wakeup.set()
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """vLLM-style async generator; closing it early aborts the request."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.aclose_sync()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wakeup.set()

    def get_stats(self, drain: bool = True) -> EngineStats:
        """Latest counters; latency observations since the previous drain."""
        with self._lock:
            ttft, tpot, e2e = self._observations
            stats = replace(self._stats, ttft_seconds=list(ttft), tpot_seconds=list(tpot), e2e_seconds=list(e2e))
            stats.num_waiting += self._num_pending
            if drain:
                self._observations = ([], [], [])
        return stats

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _handle_commands(self) -> None:
        while True:
            try:
                op, arg, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                with self._lock:
                    self._num_pending -= 1
                if stream.finished:  # the consumer left before the request started
                    self._forget(arg.request_id)
                    continue
                self.engine.scheduler.add_request(arg)
                self._streams[arg.request_id] = stream
            else:
                self.engine.abort_request(arg)
                s = self._streams.pop(arg, None)
                if s is not None:
                    s.put(_END)
                self._forget(arg)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._active.discard(request_id)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._handle_commands()
                if not self.engine.has_unfinished_requests():
                    self._publish_stats()
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
                        self._forget(out.request_id)
                self._publish_stats()
        except BaseException as e:  # noqa: BLE001 - report to every waiting consumer
            logger.error("engine loop died: %s", traceback.format_exc())
            self.dead_error = e
            for rid, stream in list(self._streams.items()):
                stream.put(EngineDeadError(f"engine loop failed: {e!r}"))
                self._forget(rid)
            self._streams.clear()
        finally:
            for rid, stream in list(self._streams.items()):  # shutdown: end open streams
                stream.put(_END)
            self._streams.clear()

    def _publish_stats(self) -> None:
        stats = self.engine.get_stats(drain=True)
        with self._lock:
            self._stats = stats
            for buf, new in zip(self._observations, (stats.ttft_seconds, stats.tpot_seconds, stats.e2e_seconds)):
                buf.extend(new)
                if len(buf) > 10000:
                    del buf[:len(buf) - 10000]
