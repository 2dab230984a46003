"""Core state, text helpers and parameter-value scanning of the Qwen3-Coder tool-call scanner.

``ScannerCore`` holds the buffer/cursor state shared by all scanner states and implements the
parameter-value states (``VALUE_START``/``VALUE``): where a value ends (``</parameter>`` only
before a schema-known ``<parameter=``, ``</function>``, ``</tool_call>``, ``<tool_call>`` or the
end; a ``<parameter=`` only at line start; literal nested ``<function=NAME>...</function>``
tracked by depth), streaming raw-string values as they arrive and converting typed values with
the schema.
``tool_scanner.ToolCallScanner`` adds the states outside values.
"""

from __future__ import annotations

import json
from typing import Any

from .tool_schema import convert_param_value, streams_as_raw_string
from .tool_tags import (
    BAD_FUNC_CHARS,
    BAD_PARAM_CHARS,
    BODY,
    CONTENT,
    FUNC_CLOSE,
    FUNC_OPEN,
    MAX_NAME_LEN,
    PARAM_CLOSE,
    PARAM_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    VALUE,
    VALUE_TAGS,
    WS,
    CallState,
    ScanEvent,
    partial_tag,
)

__all__ = ["ScannerCore"]

# At depth 0, a closing tag inside a value ends the value when (after whitespace) one of these
# follows (or the text ends); ``</parameter>`` also before a schema-known ``<parameter=NAME>``.
_CLOSERS_AFTER = {
    PARAM_CLOSE: (FUNC_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN),
    FUNC_CLOSE: (TOOL_CALL_CLOSE, TOOL_CALL_OPEN),
    TOOL_CALL_CLOSE: (TOOL_CALL_OPEN,),
}


class ScannerCore:
    """Shared state and helpers; subclasses provide ``_close_call`` and ``_to_content``."""

    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        self._tools = tools
        self._buf = ""
        self._pos = 0
        self._final = False
        self._state = CONTENT
        self._before = ""  # the character just before the buffer start ("" at the beginning)
        self._ws_memo = (-1, -1)
        self._name_at = 0  # OPEN/NAME: where "<function=" starts; _pos marks the held text start
        self._in_block = False
        self._post_call = False
        self._ws_hold: list[str] = []
        self.calls: list[CallState] = []
        self._call: CallState | None = None
        self._nparams = 0
        self._param = ""
        self._mode = ""  # "stream" | "buffer" | "skip"
        self._parts: list[str] = []
        self._pending_nl = False
        self._depth = 0
        self.events: list[ScanEvent] = []

    # ------------------------------------------------------------------ helpers
    def _skip_ws(self, i: int) -> int:
        start, end = self._ws_memo
        j = WS.match(self._buf, end if start == i else i).end()
        self._ws_memo = (i, j)
        return j

    def _prev_char(self, k: int) -> str:
        return self._buf[k - 1] if k > 0 else self._before

    def _scan_name(self, start: int, func: bool) -> tuple[str, int]:
        """Scan a function (``func``) or parameter name from ``start`` up to its '>'.

        Returns ('ok', index of '>') | ('bad', index of the offending char) | ('wait', -1).
        Function names must not contain ``{ } < " '`` or whitespace and need a letter or digit;
        parameter names must not contain '<' or a line break. Both are at most MAX_NAME_LEN long.
        """
        buf = self._buf
        bad = BAD_FUNC_CHARS if func else BAD_PARAM_CHARS
        stop = min(len(buf), start + MAX_NAME_LEN + 1)
        for i in range(start, stop):
            c = buf[i]
            if c == ">":
                name = buf[start:i]
                if not name or (func and not any(ch.isalnum() for ch in name)):
                    return "bad", i
                return "ok", i
            if c in bad or (func and c.isspace()):
                return "bad", i
        if stop - start > MAX_NAME_LEN:
            return "bad", start + MAX_NAME_LEN
        return ("bad", len(buf)) if self._final else ("wait", -1)

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        if self._post_call:
            if text.isspace():
                self._ws_hold.append(text)
                return
            text = "".join(self._ws_hold) + text
            self._ws_hold.clear()
            self._post_call = False
        if self.events and self.events[-1].kind == "content":
            self.events[-1].parts.append(text)
        else:
            self.events.append(ScanEvent("content", [text]))

    def _emit_args(self, text: str) -> None:
        assert self._call is not None
        idx = self._call.index
        last = self.events[-1] if self.events else None
        if last is not None and last.kind == "args" and last.index == idx:
            last.parts.append(text)
        else:
            self.events.append(ScanEvent("args", [text], index=idx))

    def _value_start(self) -> bool:
        buf, n = self._buf, len(self._buf)
        if self._pos == n and not self._final:
            return False
        if self._pos < n and buf[self._pos] == "\n":
            self._pos += 1
        call = self._call
        assert call is not None
        self._parts, self._pending_nl, self._depth = [], False, 0
        if self._param in call.args:
            self._mode = "skip"  # a repeated parameter: the first value wins
        elif streams_as_raw_string(self._param, call.props):
            self._mode = "stream"
            sep = ", " if self._nparams else ""
            self._emit_args(sep + json.dumps(self._param, ensure_ascii=False) + ': "')
        else:
            self._mode = "buffer"
        self._state = VALUE
        return True

    def _value(self) -> bool:
        buf, n, i = self._buf, len(self._buf), self._pos
        while True:
            k = buf.find("<", i)
            if k == -1:
                self._take_value(buf[self._pos :])
                self._pos = n
                if self._final:
                    self._end_value()
                    self._close_call()
                    return self._to_content(n)
                return False
            verdict, nxt = self._value_tag(k)
            if verdict == "literal":
                i = nxt
            elif verdict == "wait":
                self._take_value(buf[self._pos : k])
                self._pos = k
                return False
            else:  # "end": the value stops at k; the body resumes at nxt
                self._take_value(buf[self._pos : k])
                self._end_value()
                self._pos, self._state = nxt, BODY
                return True

    def _value_tag(self, k: int) -> tuple[str, int]:
        """Classify the '<' at ``k`` inside a value: ("literal", resume) | ("wait", k) | ("end", body_pos)."""
        buf, n, final = self._buf, len(self._buf), self._final
        call = self._call
        assert call is not None
        if buf.startswith(FUNC_OPEN, k):
            status, i = self._scan_name(k + len(FUNC_OPEN), func=True)
            if status == "wait":
                return "wait", k
            if status == "ok":
                self._depth += 1  # a literal nested call: its closing tags are text too
                return "literal", i + 1
            return "literal", k + len(FUNC_OPEN)
        if buf.startswith(FUNC_CLOSE, k) and self._depth:
            self._depth -= 1
            return "literal", k + len(FUNC_CLOSE)
        for tag in (PARAM_CLOSE, FUNC_CLOSE, TOOL_CALL_CLOSE):
            if not buf.startswith(tag, k):
                continue
            if self._depth:
                return "literal", k + len(tag)
            j = self._skip_ws(k + len(tag))
            if j == n:  # the text ends after the tag: it closes the value
                return ("end", j if tag == PARAM_CLOSE else k) if final else ("wait", k)
            closers = _CLOSERS_AFTER[tag]
            if any(buf.startswith(c, j) for c in closers):
                return "end", (j if tag == PARAM_CLOSE else k)
            follow = closers
            if tag == PARAM_CLOSE:
                if buf.startswith(PARAM_OPEN, j):
                    status, i = self._scan_name(j + len(PARAM_OPEN), func=False)
                    if status == "wait":
                        return "wait", k
                    if status == "ok" and call.known(buf[j + len(PARAM_OPEN) : i]):
                        return "end", j
                    return "literal", k + len(tag)
                follow = (*closers, PARAM_OPEN)
            if not final and partial_tag(buf, j, follow):
                return "wait", k
            return "literal", k + len(tag)
        if buf.startswith(PARAM_OPEN, k):
            if self._depth or self._prev_char(k) != "\n":
                return "literal", k + len(PARAM_OPEN)
            status, i = self._scan_name(k + len(PARAM_OPEN), func=False)
            if status == "wait":
                return "wait", k
            name = buf[k + len(PARAM_OPEN) : i]
            if status == "ok" and call.known(name) and name not in call.args and name != self._param:
                return "end", k  # a missing </parameter>
            return "literal", k + len(PARAM_OPEN)
        if not final and partial_tag(buf, k, VALUE_TAGS):
            return "wait", k
        return "literal", k + 1

    def _take_value(self, text: str) -> None:
        if not text or self._mode == "skip":
            return
        self._parts.append(text)
        if self._mode == "stream":
            out = ("\n" if self._pending_nl else "") + text
            self._pending_nl = out.endswith("\n")
            if self._pending_nl:
                out = out[:-1]
            if out:
                self._emit_args(json.dumps(out, ensure_ascii=False)[1:-1])

    def _end_value(self) -> None:
        call = self._call
        assert call is not None
        raw = "".join(self._parts)
        self._parts = []
        if raw.endswith("\n"):
            raw = raw[:-1]
        if self._mode == "stream":
            call.args[self._param] = raw
            self._emit_args('"')
        elif self._mode == "buffer":
            value = convert_param_value(raw, self._param, call.props)
            call.args[self._param] = value
            sep = ", " if self._nparams else ""
            key = json.dumps(self._param, ensure_ascii=False)
            self._emit_args(f"{sep}{key}: {json.dumps(value, ensure_ascii=False)}")
        if self._mode != "skip":
            self._nparams += 1
        self._mode = ""

    def _close_call(self) -> None:  # pragma: no cover - provided by ToolCallScanner
        raise NotImplementedError

    def _to_content(self, pos: int) -> bool:  # pragma: no cover - provided by ToolCallScanner
        raise NotImplementedError
