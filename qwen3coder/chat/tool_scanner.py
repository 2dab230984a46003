"""Incremental scanner for Qwen3-Coder XML tool calls (shared by streaming and non-streaming).

The scanner consumes model output text chunk by chunk and produces events: content text, a call
header (index, id, name), argument-JSON fragments and call completion. It keeps a cursor into a
buffer that only holds the still-undecided tail (a partial tag, a tag awaiting lookahead, the
text after ``<tool_call>`` before ``<function=NAME>`` is complete), so total work is linear in the
text length. Every decision depends only on the text (never on how it was split into chunks): when
the text so far cannot decide, the scanner waits for more, and ``finish()`` resolves the rest as if
the text ended there. The grammar and the hold-back rules are documented in docs/PROMPT_FORMATS.md.
"""

from __future__ import annotations

from .tool_tags import (
    AFTER_FUNC,
    BODY,
    BODY_TAGS,
    CONTENT,
    CONTENT_TAGS,
    FUNC_CLOSE,
    FUNC_OPEN,
    NAME,
    OPEN,
    PARAM_OPEN,
    PNAME,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    VALUE,
    VALUE_START,
    WS,
    CallState,
    ScanEvent,
    new_call_id,
    partial_tag,
)
from .tool_value import ScannerCore

__all__ = ["ToolCallScanner", "ScanEvent", "CallState"]


class ToolCallScanner(ScannerCore):
    """State machine over the text; call ``feed(text)`` then ``finish()``; read ``events``."""

    # ------------------------------------------------------------------ driver
    def feed(self, text: str) -> None:
        if self._final:
            raise RuntimeError("feed() called after finish()")
        if text:
            self._buf += text
            self._run()

    def finish(self) -> None:
        if self._final:
            return
        self._final = True
        self._run()
        if self._call is not None:
            self._close_call()
        self._ws_hold.clear()

    @property
    def held_back(self) -> int:
        """Undecided characters: the buffer tail plus whitespace held after a call."""
        return len(self._buf) - self._pos + sum(map(len, self._ws_hold))

    def _run(self) -> None:
        handlers = (
            self._content,
            self._open,
            self._name,
            self._body,
            self._pname,
            self._value_start,
            self._value,
            self._after_func,
        )
        while handlers[self._state]():
            pass
        cut = self._pos
        if cut:
            self._before = self._buf[cut - 1]
            self._buf = self._buf[cut:]
            self._pos = 0
            self._name_at -= cut
            start, end = self._ws_memo
            self._ws_memo = (start - cut, end - cut) if start >= cut else (-1, -1)

    def _to_content(self, pos: int) -> bool:
        self._pos, self._state, self._in_block = pos, CONTENT, False
        return True

    # ------------------------------------------------------------------ states
    def _content(self) -> bool:
        buf, n, i = self._buf, len(self._buf), self._pos
        while True:
            k = buf.find("<", i)
            if k == -1:
                self._emit_content(buf[self._pos :])
                self._pos = n
                return False
            if buf.startswith(TOOL_CALL_OPEN, k) or buf.startswith(FUNC_OPEN, k):
                self._emit_content(buf[self._pos : k])
                self._pos = self._name_at = k
                self._state = OPEN if buf.startswith(TOOL_CALL_OPEN, k) else NAME
                return True
            if not self._final and partial_tag(buf, k, CONTENT_TAGS):
                self._emit_content(buf[self._pos : k])
                self._pos = k
                return False
            i = k + 1

    def _open(self) -> bool:
        buf, n = self._buf, len(self._buf)
        j = self._skip_ws(self._pos + len(TOOL_CALL_OPEN))
        if buf.startswith(FUNC_OPEN, j):
            self._name_at, self._state, self._in_block = j, NAME, True
            return True
        if not self._final and (j == n or partial_tag(buf, j, (FUNC_OPEN,))):
            return False
        self._emit_content(TOOL_CALL_OPEN)
        return self._to_content(self._pos + len(TOOL_CALL_OPEN))

    def _name(self) -> bool:
        start = self._name_at + len(FUNC_OPEN)
        status, i = self._scan_name(start, func=True)
        if status == "wait":
            return False
        if status == "bad":  # not a real call: the held text is ordinary content
            self._emit_content(self._buf[self._pos : i])
            return self._to_content(i)
        self._ws_hold.clear()
        self._post_call = False
        call = CallState(len(self.calls), new_call_id(), self._buf[start:i], {})
        call.props = self._tools.get(call.name, {})
        self.calls.append(call)
        self._call, self._nparams = call, 0
        self.events.append(ScanEvent("header", index=call.index, call_id=call.call_id, name=call.name))
        self._emit_args("{")
        self._pos, self._state = i + 1, BODY
        return True

    def _body(self) -> bool:
        buf, n = self._buf, len(self._buf)
        j = WS.match(buf, self._pos).end()
        self._pos = j
        if j == n:
            if self._final:
                self._close_call()
                return self._to_content(n)
            return False
        if buf[j] != "<":  # debris between parameters: skipped
            k = buf.find("<", j)
            self._pos = n if k == -1 else k
            return True
        if buf.startswith(PARAM_OPEN, j):
            self._pos, self._state = j + len(PARAM_OPEN), PNAME
            return True
        if buf.startswith(FUNC_CLOSE, j):
            self._close_call()
            self._pos, self._state = j + len(FUNC_CLOSE), AFTER_FUNC
            return True
        if buf.startswith(TOOL_CALL_CLOSE, j):
            self._close_call()
            self._post_call = True
            return self._to_content(j + len(TOOL_CALL_CLOSE))
        if buf.startswith(TOOL_CALL_OPEN, j) or buf.startswith(FUNC_OPEN, j):
            self._close_call()  # a new call starts without closing this one
            self._post_call = True
            return self._to_content(j)
        if not self._final and partial_tag(buf, j, BODY_TAGS):
            return False
        self._pos = j + 1
        return True

    def _pname(self) -> bool:
        status, i = self._scan_name(self._pos, func=False)
        if status == "wait":
            return False
        if status == "bad":  # malformed parameter tag: dropped
            self._pos, self._state = i, BODY
            return True
        self._param = self._buf[self._pos : i]
        self._pos, self._state = i + 1, VALUE_START
        return True

    def _close_call(self) -> None:
        call = self._call
        if call is None:
            return
        if self._state == VALUE and self._mode:
            self._end_value()
        self._emit_args("}")
        call.closed = True
        self._call = None
        self.events.append(ScanEvent("done", index=call.index))

    def _after_func(self) -> bool:
        buf, n = self._buf, len(self._buf)
        if not self._in_block:
            self._post_call = True
            return self._to_content(self._pos)
        j = self._skip_ws(self._pos)
        if buf.startswith(TOOL_CALL_CLOSE, j):
            self._post_call = True
            return self._to_content(j + len(TOOL_CALL_CLOSE))
        if buf.startswith(FUNC_OPEN, j):  # another function inside the same <tool_call> block
            self._pos = self._name_at = j
            self._state = NAME
            return True
        if not self._final and (j == n or partial_tag(buf, j, (TOOL_CALL_CLOSE, FUNC_OPEN))):
            return False
        self._post_call = True
        return self._to_content(self._pos)
