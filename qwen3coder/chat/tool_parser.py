"""Qwen3-Coder (``qwen3_coder``) tool-call parsing: OpenAI tool calls out of model text.

The model writes calls as::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value
    </parameter>
    </function>
    </tool_call>

``parse_tool_calls(text, tools)`` returns ``(content_or_None, tool_calls)`` for a finished
output; ``ToolCallStreamParser(tools)`` turns the same text, arriving in arbitrary deltas, into
OpenAI chat-completion stream ``delta`` objects. Both run the same incremental scanner
(``tool_scanner.ToolCallScanner``), so for any split of a text into deltas the streamed content
concatenates to the non-streaming content and each call's argument fragments concatenate to the
non-streaming ``arguments`` string (``json.dumps(args, ensure_ascii=False)``). Values are
converted with the tool's JSON schema (``tool_schema``). The rules and the hold-back behaviour
are documented in docs/PROMPT_FORMATS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tool_scanner import FUNC_OPEN, ScanEvent, ToolCallScanner
from .tool_schema import normalize_tools

__all__ = ["parse_tool_calls", "ToolCallStreamParser"]


def parse_tool_calls(text: str, tools: Sequence[Any] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """Extract tool calls from a complete model output.

    Returns ``(content, tool_calls)``: ``content`` is the text outside the calls (``None`` when
    empty), each tool call is ``{"id": "call_<24 hex>", "type": "function",
    "function": {"name": ..., "arguments": "<JSON object>"}}``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    table = normalize_tools(tools)
    if FUNC_OPEN not in text:
        return (text or None), []
    scanner = ToolCallScanner(table)
    scanner.feed(text)
    scanner.finish()
    content = "".join(e.text for e in scanner.events if e.kind == "content")
    return (content or None), [c.as_tool_call() for c in scanner.calls]


class ToolCallStreamParser:
    """Streaming counterpart of ``parse_tool_calls``.

    ``feed(delta_text)`` and ``finish()`` return lists of OpenAI stream ``delta`` dicts:
    ``{"content": str}`` or ``{"tool_calls": [{"index", "id", "type", "function": {"name",
    "arguments"}}]}`` (id, type and name only in the first fragment of a call, whose arguments
    are ``""``; later fragments carry ``{"index", "function": {"arguments"}}``).
    ``tool_calls`` lists the calls completed so far in their final form (all calls after
    ``finish()``), for ``finish_reason: "tool_calls"``.
    """

    def __init__(self, tools: Sequence[Any] | None = None) -> None:
        self._scanner = ToolCallScanner(normalize_tools(tools))
        self._finished = False

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        """Consume the next piece of model output; return the deltas that became certain."""
        if not isinstance(delta_text, str):
            raise TypeError(f"delta_text must be a str, got {type(delta_text).__name__}")
        if self._finished:
            raise RuntimeError("feed() called after finish()")
        self._scanner.feed(delta_text)
        return self._drain()

    def finish(self) -> list[dict[str, Any]]:
        """The output is complete: flush held-back text and close an unterminated call."""
        if self._finished:
            return []
        self._finished = True
        self._scanner.finish()
        return self._drain()

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Completed calls as non-streaming tool-call dicts (like vLLM's ``prev_tool_call_arr``)."""
        return [c.as_tool_call() for c in self._scanner.calls if c.closed]

    @property
    def held_back(self) -> int:
        """Characters received but not yet decided (a partial tag, text after ``<tool_call>``...)."""
        return self._scanner.held_back

    @property
    def started_tool_calls(self) -> int:
        """Number of calls whose header has been emitted (finished or not)."""
        return len(self._scanner.calls)

    def _drain(self) -> list[dict[str, Any]]:
        events = self._scanner.events
        self._scanner.events = []
        return [d for d in (_to_delta(e) for e in events) if d is not None]


def _to_delta(event: ScanEvent) -> dict[str, Any] | None:
    if event.kind == "content":
        return {"content": event.text} if event.text else None
    if event.kind == "header":
        fn = {"name": event.name, "arguments": ""}
        return {"tool_calls": [{"index": event.index, "id": event.call_id, "type": "function", "function": fn}]}
    if event.kind == "args":
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    return None  # "done" carries no delta
