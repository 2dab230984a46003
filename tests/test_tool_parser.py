"""Conformance (FACTS §4.3 cases 1-12) and adversarial tests of the qwen3_coder tool-call parser.

Every case runs non-streaming and streaming. Streaming feeds one character at a time and, where
the reference material exists, also tokenizes the output with the real Qwen3-Coder tokenizer and
feeds one token's text at a time through the incremental detokenizer (skip_special_tokens=False),
like vLLM's tests (tests that need the tokenizer skip without it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from qwen3coder.chat.detokenizer import IncrementalDetokenizer
from qwen3coder.chat.tokenizer import Tokenizer, load_tokenizer
from qwen3coder.chat.tool_parser import ToolCallStreamParser, parse_tool_calls

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOK_DIR = REF / "qwen3-coder-30b-a3b-instruct"
ID_RE = re.compile(r"^call_[0-9a-f]{24}$")


def _fn(name: str, props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": name, "parameters": params}}


WEATHER = _fn(
    "get_current_weather",
    {
        "city": {"type": "string", "description": "The city"},
        "state": {"type": "string"},
        "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
    },
    ["city", "state"],
)
AREA = _fn(
    "calculate_area", {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}}
)
TYPES = _fn(
    "test_types",
    {
        "int_param": {"type": "integer"},
        "float_param": {"type": "float"},
        "bool_param": {"type": "boolean"},
        "str_param": {"type": "string"},
        "obj_param": {"type": "object"},
    },
)
WRITE = _fn("write_file", {"path": {"type": "string"}, "content": {"type": "string"}})
TOOLS = [WEATHER, AREA]


def weather_call(city: str, state: str, unit: str | None = "fahrenheit") -> str:
    unit_part = f"<parameter=unit>\n{unit}\n</parameter>\n" if unit else ""
    return (
        f"<tool_call>\n<function=get_current_weather>\n<parameter=city>\n{city}\n</parameter>\n"
        f"<parameter=state>\n{state}\n</parameter>\n{unit_part}</function>\n</tool_call>"
    )


_TOK: Tokenizer | None = None


def token_deltas(text: str) -> list[str]:
    """The text as an engine would stream it: one token at a time through the detokenizer."""
    global _TOK
    if not (TOK_DIR / "vocab.json").is_file():
        pytest.skip(f"Qwen3-Coder reference tokenizer files not found under {REF} (they live beside the repo)")
    if _TOK is None:
        _TOK = load_tokenizer(TOK_DIR)
    detok = IncrementalDetokenizer(_TOK, skip_special_tokens=False)
    out = [detok.add_token(i) for i in _TOK.encode(text)]
    out.append(detok.finish())
    assert "".join(out) == text
    return out


def stream_splits(text: str) -> list[list[str]]:
    """Delta sequences to test: per character always; per token when the reference tokenizer exists."""
    splits = [list(text)]
    if (TOK_DIR / "vocab.json").is_file():
        splits.append(token_deltas(text))
    return splits


def run_stream(
    deltas: list[str], tools: Any
) -> tuple[str | None, list[dict[str, Any]], list[dict], ToolCallStreamParser]:
    """Feed deltas; check the delta protocol; return (content, calls, all deltas, parser)."""
    parser = ToolCallStreamParser(tools)
    out: list[dict] = []
    for d in deltas:
        out += parser.feed(d)
    out += parser.finish()
    content, calls = "", {}
    for delta in out:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"]
            content += delta["content"]
            continue
        (item,) = delta["tool_calls"]
        idx = item["index"]
        if idx not in calls:
            assert idx == len(calls), "indices are consecutive"
            assert ID_RE.match(item["id"]) and item["type"] == "function"
            assert item["function"]["arguments"] == ""
            calls[idx] = {"id": item["id"], "name": item["function"]["name"], "arguments": ""}
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
            calls[idx]["arguments"] += item["function"]["arguments"]
    result = [calls[i] for i in sorted(calls)]
    for call in result:
        json.loads(call["arguments"])  # always valid JSON
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parser.tool_calls] == [
        (c["name"], c["arguments"]) for c in result
    ]
    return (content or None), result, out, parser


def both_modes(text: str, tools: Any) -> tuple[str | None, list[tuple[str, dict]]]:
    """Parse non-streaming and streaming (per char and per token); assert they agree; return the result."""
    content, calls = parse_tool_calls(text, tools)
    for call in calls:
        assert ID_RE.match(call["id"]) and call["type"] == "function"
        assert set(call["function"]) == {"name", "arguments"}
    for deltas in stream_splits(text):
        s_content, s_calls, _, _ = run_stream(deltas, tools)
        assert s_content == content
        assert [(c["name"], c["arguments"]) for c in s_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls
        ]
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


DALLAS = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}


# ----------------------------------------------------------------------------- cases 1-12
def test_case01_no_tools():
    text = "This is a test response without any tool calls"
    assert both_modes(text, TOOLS) == (text, [])
    assert parse_tool_calls(text, None) == (text, [])


def test_case02_single_tool():
    assert both_modes(weather_call("Dallas", "TX"), TOOLS) == (None, [("get_current_weather", DALLAS)])


def test_case03_single_tool_with_content():
    text = "Sure! Let me check the weather for you." + weather_call("Dallas", "TX")
    assert both_modes(text, TOOLS) == ("Sure! Let me check the weather for you.", [("get_current_weather", DALLAS)])


def test_case04_multiline_param():
    text = (
        "<tool_call>\n<function=calculate_area>\n<parameter=shape>\nrectangle\n</parameter>\n"
        '<parameter=dimensions>\n{"width": 10, \n "height": 20}\n</parameter>\n'
        "<parameter=precision>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    expected = {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2}
    assert both_modes(text, TOOLS) == (None, [("calculate_area", expected)])


def test_case05_parallel_tools():
    text = weather_call("Dallas", "TX") + "\n" + weather_call("Orlando", "FL", "celsius")
    content, calls = both_modes(text, TOOLS)
    assert content is None
    assert calls == [
        ("get_current_weather", DALLAS),
        ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "celsius"}),
    ]


def test_case06_typed_params():
    text = (
        "Let me calculate that area for you.<tool_call>\n<function=calculate_area>\n<parameter=shape>\ncircle\n"
        '</parameter>\n<parameter=dimensions>\n{"radius": 15.5}\n</parameter>\n<parameter=precision>\n3\n'
        "</parameter>\n</function>\n</tool_call>"
    )
    expected = {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3}
    assert both_modes(text, TOOLS) == ("Let me calculate that area for you.", [("calculate_area", expected)])


def test_case07_fallback_no_tags():
    text = (
        "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n"
        "</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>"
    )
    assert both_modes(text, TOOLS) == (None, [("get_current_weather", DALLAS)])


def test_case08_type_conversion():
    text = (
        "<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n</parameter>\n<parameter=float_param>\n"
        "3.14\n</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n<parameter=str_param>\nhello world\n"
        '</parameter>\n<parameter=obj_param>\n{"key": "value"}\n</parameter>\n</function>\n</tool_call>'
    )
    _, [(name, args)] = both_modes(text, [TYPES])
    assert name == "test_types"
    assert args == {
        "int_param": 42,
        "float_param": 3.14,
        "bool_param": True,
        "str_param": "hello world",
        "obj_param": {"key": "value"},
    }
    assert type(args["int_param"]) is int and type(args["bool_param"]) is bool


def test_case09_streaming_protocol():
    # every case above also ran through run_stream(); here: ids, names once, prev_tool_call_arr
    text = "Checking." + weather_call("Dallas", "TX") + "\n" + weather_call("Orlando", "FL")
    content, calls, deltas, parser = run_stream(token_deltas(text), TOOLS)
    assert content == "Checking."
    assert len(parser.tool_calls) == 2 and calls[0]["id"] != calls[1]["id"]
    names = [d["tool_calls"][0]["function"].get("name") for d in deltas if "tool_calls" in d]
    assert [n for n in names if n] == ["get_current_weather", "get_current_weather"]


def test_case10_missing_closing_parameter_tag():
    text = (
        "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
        "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>"
    )
    content, calls = both_modes(text, TOOLS)
    assert "Let me check the weather for you" in content
    assert calls == [("get_current_weather", DALLAS)]


def test_case11_streaming_incremental():
    text = "I'll check the weather." + weather_call("Dallas", "TX", unit=None)
    _, calls, deltas, _ = run_stream(token_deltas(text), TOOLS)
    assert len(deltas) > 3
    assert set(deltas[0]) == {"content"}  # the first chunk is content only
    headers = [d for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert len(headers) == 1
    header = headers[0]["tool_calls"][0]
    assert header["type"] == "function" and header["function"] == {"name": "get_current_weather", "arguments": ""}
    arg_chunks = [d for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert len(arg_chunks) > 1
    assert json.loads(calls[0]["arguments"]) == {"city": "Dallas", "state": "TX"}


def test_case12_complex_type_with_single_quote():
    text = (
        "<tool_call>\n<function=test_types>\n<parameter=obj_param>\n{'key': 'value'}\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert both_modes(text, [TYPES]) == (None, [("test_types", {"obj_param": {"key": "value"}})])
