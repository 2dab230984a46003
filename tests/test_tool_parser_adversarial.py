"""Adversarial cases for the qwen3_coder tool-call parser (both modes, per-token streaming)."""

from __future__ import annotations

import json

import pytest

from qwen3coder.chat.tool_parser import ToolCallStreamParser, parse_tool_calls
from qwen3coder.chat.tool_schema import convert_param_value
from tests.test_tool_parser import AREA, TOOLS, TYPES, WEATHER, WRITE, _fn, both_modes, run_stream, weather_call

DALLAS = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}


def write_call(path: str, content: str) -> str:
    return (
        f"<tool_call>\n<function=write_file>\n<parameter=path>\n{path}\n</parameter>\n"
        f"<parameter=content>\n{content}\n</parameter>\n</function>\n</tool_call>"
    )


# ----------------------------------------------------------------------------- literal tags in values
def test_literal_closing_tags_inside_string_value():
    body = "a </parameter> b\n</parameter>\nnot a param\n</function> x\n</tool_call> y\n<parameter=path> z"
    assert both_modes(write_call("f.txt", body), [WRITE]) == (
        None,
        [("write_file", {"path": "f.txt", "content": body})],
    )


def test_nested_tool_call_block_inside_value():
    nested = (
        "Example:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
        "</function>\n</tool_call>\nend of doc"
    )
    text = "Writing docs." + write_call("doc.md", nested) + "\n" + weather_call("Dallas", "TX")
    content, calls = both_modes(text, [WRITE, WEATHER])
    assert content == "Writing docs."
    assert calls == [("write_file", {"path": "doc.md", "content": nested}), ("get_current_weather", DALLAS)]


def test_parameter_tag_only_counts_at_line_start():
    text = (
        "<tool_call>\n<function=write_file>\n<parameter=content>\nx = '<parameter=path>'\n"
        "<parameter=path>\np.py\n</parameter>\n</function>\n</tool_call>"
    )
    # mid-line: literal; at line start after a missing </parameter>: closes the value
    assert both_modes(text, [WRITE]) == (None, [("write_file", {"content": "x = '<parameter=path>'", "path": "p.py"})])


def test_code_with_unbalanced_function_tag():
    body = 'TAG = "<function="\nprint(TAG)'
    assert both_modes(write_call("t.py", body), [WRITE]) == (None, [("write_file", {"path": "t.py", "content": body})])


# ----------------------------------------------------------------------------- prose mentioning tags
def test_prose_mentioning_tool_call_streams_promptly():
    text = "Use the `<tool_call>` tag, then <tool_call> again and <function= too."
    assert both_modes(text, TOOLS)[0] == text
    parser = ToolCallStreamParser(TOOLS)
    got = "".join(d["content"] for ch in text for d in parser.feed(ch))
    assert got == text  # everything is out before finish(): each tag was followed by non-call text
    assert parser.finish() == []
    # a possible call start is held only until the text shows it is none
    parser = ToolCallStreamParser(TOOLS)
    got = "".join(d["content"] for ch in "See <function=get_weather" for d in parser.feed(ch))
    assert got == "See " and parser.held_back == len("<function=get_weather")
    assert parser.feed(" (the tag)") == [{"content": "<function=get_weather (the tag)"}]


def test_hold_back_is_released_at_divergence():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("a <tool") == [{"content": "a "}]
    assert parser.feed("_call>") == []
    assert parser.feed("\n  ") == []
    assert parser.feed("x") == [{"content": "<tool_call>\n  x"}]
    assert parser.held_back == 0


def test_phantom_function_names_stay_content():
    for name in ("{{ tool.name }}", "example function", "'quoted'", "...", ""):
        text = f"Format: <tool_call>\n<function={name}>\n</function>\n</tool_call> done"
        assert both_modes(text, TOOLS) == (text, []), name
    long_name = "x" * 300
    assert both_modes(f"<function={long_name}>", TOOLS) == (f"<function={long_name}>", [])


def test_unterminated_function_name_is_content():
    assert both_modes("Calling <tool_call>\n<function=get_cur", TOOLS) == ("Calling <tool_call>\n<function=get_cur", [])


# ----------------------------------------------------------------------------- malformed / partial calls
def test_unterminated_call_closed_at_finish():
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDal"
    assert both_modes(text, TOOLS) == (None, [("get_current_weather", {"city": "Dal"})])
    text = "<tool_call>\n<function=calculate_area>\n<parameter=precision>\n2\n"
    assert both_modes(text, TOOLS) == (None, [("calculate_area", {"precision": 2})])
    assert both_modes("<tool_call>\n<function=calculate_area>\n<parame", TOOLS) == (None, [("calculate_area", {})])


def test_empty_arguments():
    text = "<tool_call>\n<function=get_current_weather>\n</function>\n</tool_call>"
    assert both_modes(text, TOOLS) == (None, [("get_current_weather", {})])
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\n</parameter>\n</function>\n</tool_call>"
    assert both_modes(text, TOOLS) == (None, [("get_current_weather", {"city": ""})])


def test_missing_function_and_tool_call_closers():
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</function>\n</tool_call>"
    assert both_modes(text, TOOLS) == (None, [("get_current_weather", {"city": "Dallas"})])
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\nBye"
    assert both_modes(text, TOOLS) == ("\nBye", [("get_current_weather", {"city": "Dallas"})])


def test_unknown_and_repeated_parameters():
    # an unknown name in the body is kept as a raw string; a repeated name keeps the first value
    text = (
        "<tool_call>\n<function=calculate_area>\n<parameter=colour>\n42\n</parameter>\n<parameter=precision>\n2\n"
        "</parameter>\n<parameter=precision>\n5\n</parameter>\n</function>\n</tool_call>"
    )
    assert both_modes(text, TOOLS) == (None, [("calculate_area", {"colour": "42", "precision": 2})])
    # after a value, '</parameter>' followed by a name the schema does not know is literal text
    text = (
        "<tool_call>\n<function=calculate_area>\n<parameter=shape>\nsquare\n</parameter>\n<parameter=bogus>\n1\n"
        "</parameter>\n</function>\n</tool_call>"
    )
    shape = "square\n</parameter>\n<parameter=bogus>\n1"
    assert both_modes(text, TOOLS) == (None, [("calculate_area", {"shape": shape})])
    # a function the tools do not define: any parameter name is accepted, values stay strings
    text = (
        "<tool_call>\n<function=other>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert both_modes(text, TOOLS) == (None, [("other", {"a": "1", "b": "2"})])
    assert both_modes(text, None) == (None, [("other", {"a": "1", "b": "2"})])


def test_text_between_and_after_calls():
    text = "Intro\n" + weather_call("Dallas", "TX") + "\n\n" + weather_call("Austin", "TX") + "\nDone.\n"
    content, calls = both_modes(text, TOOLS)
    assert content == "Intro\n\nDone.\n"
    assert [c[1]["city"] for c in calls] == ["Dallas", "Austin"]
    # whitespace-only text between/after calls is dropped
    assert both_modes(weather_call("Dallas", "TX") + "\n \n", TOOLS)[0] is None


def test_several_calls_and_trailing_text_in_one_delta():
    text = "Go." + weather_call("Dallas", "TX") + weather_call("Austin", "TX") + " trailing"
    content, calls, deltas, parser = run_stream([text[:5], text[5:]], TOOLS)
    assert content == "Go. trailing"
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Dallas", "Austin"]
    expected = parse_tool_calls(text, TOOLS)
    assert [c["function"]["arguments"] for c in expected[1]] == [c["arguments"] for c in calls]


def test_two_functions_in_one_block():
    text = (
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nA\n</parameter>\n</function>\n"
        "<function=get_current_weather>\n<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>"
    )
    assert both_modes(text, TOOLS) == (
        None,
        [("get_current_weather", {"city": "A"}), ("get_current_weather", {"city": "B"})],
    )


def test_unicode_values_and_names():
    body = '你好, мир 🚀\n\t"quoted" \\ back\\slash \u2028 end'
    content, calls = both_modes("Écrivons 🚀" + write_call("données/ファイル.txt", body), [WRITE])
    assert content == "Écrivons 🚀"
    assert calls == [("write_file", {"path": "données/ファイル.txt", "content": body})]
    args = parse_tool_calls(write_call("p", "🚀"), [WRITE])[1][0]["function"]["arguments"]
    assert "🚀" in args  # ensure_ascii=False


# ----------------------------------------------------------------------------- schema conversion
NULLABLE = _fn(
    "n",
    {
        "s": {"type": "string"},
        "ns": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "i": {"type": "integer"},
        "li": {"type": ["integer", "null"]},
        "num": {"type": "number"},
        "b": {"type": "boolean"},
        "arr": {"type": "array"},
        "o": {"type": "object"},
        "any": {"description": "no type"},
    },
)


@pytest.mark.parametrize(
    "name,raw,expected",
    [
        ("s", "null", "null"),
        ("ns", "null", None),
        ("ns", "None", None),
        ("ns", "text", "text"),
        ("i", "null", None),
        ("i", "7", 7),
        ("i", "7.5", "7.5"),
        ("li", "42", 42),
        ("li", "null", None),
        ("num", "3.0", 3),
        ("num", "2.5", 2.5),
        ("num", "1e400", "1e400"),
        ("num", "nan", "nan"),
        ("b", "TRUE", True),
        ("b", "yes", False),
        ("arr", "[1, 'two']", [1, "two"]),
        ("arr", "(1, 2)", [1, 2]),
        ("o", '"{\\"a\\": 1}"', {"a": 1}),
        ("o", "\"{'k': 'v'}\"", {"k": "v"}),
        ("o", "{1, 2}", "{1, 2}"),
        ("o", "{not json", "{not json"),
        ("any", "5", "5"),
        ("unknown", "5", "5"),
    ],
)
def test_convert_param_value(name, raw, expected):
    props = NULLABLE["function"]["parameters"]["properties"]
    value = convert_param_value(raw, name, props)
    assert value == expected and type(value) is type(expected)
    json.dumps(value, allow_nan=False)


def test_typed_values_end_to_end():
    text = (
        "<tool_call>\n<function=n>\n<parameter=ns>\nnull\n</parameter>\n<parameter=li>\n42\n</parameter>\n"
        "<parameter=num>\n3.0\n</parameter>\n<parameter=o>\n{'k': [1, None, True]}\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert both_modes(text, [NULLABLE]) == (
        None,
        [("n", {"ns": None, "li": 42, "num": 3, "o": {"k": [1, None, True]}})],
    )


def test_bad_tools_argument():
    with pytest.raises(TypeError, match="tools"):
        parse_tool_calls("<function=f>", "not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tools\[0\]"):
        ToolCallStreamParser([42])
    with pytest.raises(TypeError):
        parse_tool_calls(None, TOOLS)  # type: ignore[arg-type]
    parser = ToolCallStreamParser(TOOLS)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    assert parser.finish() == []


def test_bare_function_tool_definitions():
    tools = [{"name": "calculate_area", "parameters": AREA["function"]["parameters"]}, TYPES]
    text = "<function=calculate_area>\n<parameter=precision>\n4\n</parameter>\n</function>"
    assert both_modes(text, tools) == (None, [("calculate_area", {"precision": 4})])


def test_next_call_after_missing_closers():
    # '</parameter>' or '</function>' directly followed by the next '<tool_call>' ends the call
    first = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nA\n</parameter>\n"
    second = weather_call("B", "TX", unit=None)
    for glue in ("", "</function>\n"):
        assert both_modes(first + glue + second, TOOLS) == (
            None,
            [("get_current_weather", {"city": "A"}), ("get_current_weather", {"city": "B", "state": "TX"})],
        )
