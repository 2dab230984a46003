"""Tags, limits and small data types of the Qwen3-Coder tool-call scanner (see ``tool_scanner``)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
MAX_NAME_LEN = 256
CONTENT_TAGS = (TOOL_CALL_OPEN, FUNC_OPEN)
BODY_TAGS = (PARAM_OPEN, FUNC_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FUNC_OPEN)
VALUE_TAGS = (PARAM_CLOSE, PARAM_OPEN, FUNC_CLOSE, TOOL_CALL_CLOSE, FUNC_OPEN)
BAD_FUNC_CHARS = frozenset("{}<>\"'")
BAD_PARAM_CHARS = frozenset("<\n\r")
WS = re.compile(r"\s*")

CONTENT, OPEN, NAME, BODY, PNAME, VALUE_START, VALUE, AFTER_FUNC = range(8)


@dataclass
class ScanEvent:
    """``kind`` is "content" (text), "header" (index, call_id, name), "args" (index, text) or "done"."""

    kind: str
    parts: list[str] = field(default_factory=list)  # text pieces, joined once by ``text``
    index: int = -1
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class CallState:
    index: int
    call_id: str
    name: str
    props: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)
    closed: bool = False

    def known(self, pname: str) -> bool:
        return pname in self.props if self.props else True

    def as_tool_call(self) -> dict[str, Any]:
        arguments = json.dumps(self.args, ensure_ascii=False)
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def partial_tag(buf: str, k: int, tags: tuple[str, ...]) -> bool:
    """``buf[k:]`` (the end of the buffer) is a proper prefix of one of ``tags``."""
    left = len(buf) - k
    return any(left < len(t) and t.startswith(buf[k:]) for t in tags)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
