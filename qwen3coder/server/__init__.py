"""The OpenAI-compatible server (FastAPI + uvicorn over `AsyncLLMEngine`) and its web chat page.

`qwen3coder serve` starts it (see docs/SERVING.md). Modules: `app` (routes, auth, request
accounting), `protocol` (request models), `chat_handler` / `completion_handler` (the two generation
endpoints), `tool_choice` and `json_mode` (how forced tool calls and JSON replies are produced),
`formatting` (logprobs, usage), `errors` (OpenAI error bodies), `metrics` (Prometheus text),
`state` (shared state, engine submission, disconnect handling), `launcher` (engine, socket,
uvicorn), `client` (the HTTP client of `qwen3coder chat` / `complete`), `static/` (the page).
"""

from typing import Any

__all__ = ["ServerState", "build_app"]


def __getattr__(name: str) -> Any:  # lazy: `qwen3coder --help` must not import torch
    if name == "build_app":
        from qwen3coder.server.app import build_app

        return build_app
    if name == "ServerState":
        from qwen3coder.server.state import ServerState

        return ServerState
    raise AttributeError(f"module 'qwen3coder.server' has no attribute {name!r}")
