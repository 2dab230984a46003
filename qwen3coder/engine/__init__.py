"""The inference engine: continuous batching, chunked prefill, paged KV cache with prefix caching,
batched sampling; `LLM` for offline use and `AsyncLLMEngine` for the server (docs/ENGINE.md)."""

from qwen3coder.engine.async_engine import AsyncLLMEngine, QueueFullError
from qwen3coder.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from qwen3coder.engine.llm import LLM
from qwen3coder.engine.llm_engine import LLMEngine
from qwen3coder.engine.metrics import EngineStats
from qwen3coder.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from qwen3coder.engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "AsyncLLMEngine", "CacheConfig", "CompletionOutput", "EngineConfig", "EngineStats", "LLM", "LLMEngine",
    "Logprob", "QueueFullError", "RequestMetrics", "RequestOutput", "RequestOutputKind", "SamplingParams",
    "SchedulerConfig",
]
