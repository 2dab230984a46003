"""Property and complexity tests of the streaming qwen3_coder tool-call parser."""

from __future__ import annotations

import json
import re
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3coder.chat.tool_parser import ToolCallStreamParser, parse_tool_calls
from tests.test_tool_parser import _fn, run_stream

TOOLS = [
    _fn(
        "write_file",
        {
            "path": {"type": "string"},
            "content": {"type": "string"},
            "mode": {"type": "integer"},
            "opt": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "obj": {"type": "object"},
        },
    ),
    _fn("get_current_weather", {"city": {"type": "string"}, "state": {"type": "string"}}),
]

# Building blocks for arbitrary (often malformed) outputs: tags, tag fragments, values, prose.
PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<function=write_file>",
    "<function=get_current_weather>",
    "<function=x y>",
    "<function=",
    "</function>",
    "<parameter=path>",
    "<parameter=content>",
    "<parameter=mode>",
    "<parameter=obj>",
    "<parameter=opt>",
    "<parameter=bogus>",
    "<parameter=",
    "</parameter>",
    "\n",
    "\n\n",
    " ",
    "  \t",
    "a",
    "hello",
    "<",
    ">",
    "<tool_",
    "</para",
    "null",
    "42",
    "3.0",
    '{"a": 1}',
    "{'k': [1, None]}",
    "😀",
    "中文",
    "é\u0301",
    '"quoted"',
    "\\",
    "{{ name }}",
]
texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(text)]:
        out.append(text[prev:p])
        prev = p
    return out


def assert_stream_equals_parse(text: str, deltas: list[str]) -> None:
    content, calls = parse_tool_calls(text, TOOLS)
    s_content, s_calls, _, parser = run_stream(deltas, TOOLS)
    assert s_content == content
    assert [(c["name"], c["arguments"]) for c in s_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    assert len(parser.tool_calls) == len(calls)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_streams_like_non_streaming(text, cuts):
    assert_stream_equals_parse(text, split(text, cuts))


@settings(max_examples=40, deadline=None)
@given(text=texts)
def test_char_by_char_streams_like_non_streaming(text):
    assert_stream_equals_parse(text, list(text))


VALUE_PIECES = list("ab <>/=\n\"'\\{}[]:,0123456789") + ["😀", "中", "</parameter>", "<tool_call>", "</function>"]
# A value holding a real closing sequence (e.g. "</parameter>\n</function>") is ambiguous by design;
# every other literal tag inside a value must survive.
# The closing sequences are those of tool_value._CLOSERS_AFTER: `</parameter>` or `</function>` followed
# by `<tool_call>` also closes (recovery of a call whose closing tags are missing).
AMBIGUOUS = re.compile(
    r"</parameter>\s*(</function>|</tool_call>|<parameter=|<tool_call>)|</function>\s*(</tool_call>|<tool_call>)"
    r"|</tool_call>\s*<tool_call>"
)
values = st.lists(st.sampled_from(VALUE_PIECES), max_size=40).map("".join).filter(lambda v: not AMBIGUOUS.search(v))
prose_texts = st.lists(st.sampled_from(list("ab .\n`") + ["<tool_call>", "<func"]), max_size=20).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prose=prose_texts,
    calls=st.lists(st.tuples(st.sampled_from(["path", "content"]), values), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_well_formed_calls_round_trip(prose, calls, cuts):
    """Generated well-formed calls (string values may hold literal tags) parse back exactly."""
    blocks = []
    for name, value in calls:
        blocks.append(
            f"<tool_call>\n<function=write_file>\n<parameter={name}>\n{value}\n</parameter>\n</function>\n</tool_call>"
        )
    text = prose + "\n".join(blocks)
    content, parsed = parse_tool_calls(text, TOOLS)
    assert content == (prose or None)
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [{n: v} for n, v in calls]
    assert_stream_equals_parse(text, split(text, cuts))


def _stream_big(size: int) -> tuple[float, int]:
    body = ("def f(x):\n    return '<tag>' + x  # </param\n" * (size // 40 + 1))[:size]
    text = (
        "Writing.<tool_call>\n<function=write_file>\n<parameter=path>\nbig.py\n</parameter>\n"
        f"<parameter=content>\n{body}\n</parameter>\n</function>\n</tool_call>"
    )
    parser = ToolCallStreamParser(TOOLS)
    args, max_held = [], 0
    start = time.perf_counter()
    for ch in text:
        for d in parser.feed(ch):
            args += [tc["function"]["arguments"] for tc in d.get("tool_calls", [])]
        max_held = max(max_held, parser.held_back)
    for d in parser.finish():
        args += [tc["function"]["arguments"] for tc in d.get("tool_calls", [])]
    elapsed = time.perf_counter() - start
    assert json.loads("".join(args)) == {"path": "big.py", "content": body}
    return elapsed, max_held


def test_large_argument_streamed_char_by_char_is_linear():
    """A 200 KB string argument in 1-char deltas: the parser only ever holds a short undecided tail
    (so each delta costs O(1) amortised) and the whole stream finishes quickly."""
    small_time, small_held = _stream_big(10_000)
    big_time, big_held = _stream_big(200_000)
    assert small_held == big_held <= 64  # independent of the argument size (the longest hold is the call header)
    assert big_time < 30  # generous: ~1 s expected; quadratic behaviour would take minutes
    assert big_time < 20 * small_time * 20 + 1  # 20x the input: far from 400x


def test_large_typed_argument_and_many_calls_non_streaming():
    obj = {"k": ["v" * 50] * 2000}
    text = "<function=write_file>\n<parameter=obj>\n" + json.dumps(obj) + "\n</parameter>\n</function>"
    calls = "\n".join([text] * 200)
    start = time.perf_counter()
    content, parsed = parse_tool_calls(calls, TOOLS)
    assert time.perf_counter() - start < 30
    assert content is None and len(parsed) == 200
    assert json.loads(parsed[-1]["function"]["arguments"]) == {"obj": obj}
    prose = "The `<tool_call>` tag and <function= x> < y. " * 20_000
    start = time.perf_counter()
    content, parsed = parse_tool_calls(prose + text, TOOLS)
    assert time.perf_counter() - start < 30
    assert content == prose and len(parsed) == 1
