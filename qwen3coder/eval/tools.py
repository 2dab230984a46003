"""Tool-call well-formedness: does the model answer "use this tool" requests with valid calls?

Each case is a user request plus a few tools (OpenAI function schemas), rendered with the model's own
chat template (``add_generation_prompt=True``) and decoded greedily. An output is *well-formed* when
``parse_tool_calls`` finds at least one call and every call names one of the offered tools and has
arguments that validate against that tool's schema: a JSON object, every required parameter present,
no unknown parameter, and each value of the declared JSON type (and in ``enum`` where one is given).
This measures the format, not whether the chosen call is the right one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen3coder.chat.template import render_chat
from qwen3coder.chat.tool_parser import parse_tool_calls

__all__ = ["ToolCase", "TOOLS", "default_cases", "validate_arguments", "is_wellformed", "tool_call_wellformed_rate"]


def _fn(name: str, description: str, props: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(required)}}}


TOOLS: dict[str, dict[str, Any]] = {t["function"]["name"]: t for t in (
    _fn("get_weather", "Current weather for a city.",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _fn("read_file", "Read a text file of the repository.", {"path": {"type": "string"}}, ["path"]),
    _fn("write_file", "Write a text file.", {"path": {"type": "string"}, "content": {"type": "string"}},
        ["path", "content"]),
    _fn("run_tests", "Run the test suite (optionally one file) and return the report.",
        {"path": {"type": "string"}, "verbose": {"type": "boolean"}}, []),
    _fn("search_code", "Search the repository for a regular expression.",
        {"pattern": {"type": "string"}, "max_results": {"type": "integer"}}, ["pattern"]),
    _fn("execute_python", "Execute Python code and return its output.", {"code": {"type": "string"}}, ["code"]),
    _fn("add_numbers", "Add two numbers.", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]),
    _fn("create_issue", "Open an issue in the tracker.",
        {"title": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}}}, ["title"]),
)}

_REQUESTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What's the weather in Paris right now, in celsius?", ("get_weather", "search_code")),
    ("Show me the contents of src/main.py.", ("read_file", "write_file")),
    ("Create a file hello.py that prints hello world.", ("write_file", "read_file")),
    ("Run the tests in tests/test_api.py with verbose output.", ("run_tests", "execute_python")),
    ("Find every place where `TODO` appears in the code, at most 20 results.", ("search_code", "read_file")),
    ("Compute the 20th Fibonacci number by running Python code.", ("execute_python", "add_numbers")),
    ("What is 1234.5 plus 8765.5? Use the tool.", ("add_numbers", "execute_python")),
    ("Open an issue titled 'Crash on empty input' with the label bug.", ("create_issue", "search_code")),
    ("Is it raining in Tokyo?", ("get_weather",)),
    ("Read the README.md file.", ("read_file",)),
    ("Run the whole test suite.", ("run_tests", "read_file", "write_file")),
    ("Search for the definition of `def parse_args`.", ("search_code",)),
    ("Write 'x = 1' into config.py.", ("write_file",)),
    ("Add 2 and 40 using the add_numbers tool.", ("add_numbers",)),
    ("Print the current Python version by executing code.", ("execute_python", "run_tests")),
    ("File an issue 'Docs are outdated' with labels docs and good-first-issue.", ("create_issue",)),
)


@dataclass(frozen=True)
class ToolCase:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]


def default_cases(num: int | None = None) -> list[ToolCase]:
    """The built-in requests (16), each with its tools; the first ``num`` of them."""
    cases = [ToolCase([{"role": "system", "content": "You are a helpful coding assistant. Use the tools."},
                       {"role": "user", "content": request}], [TOOLS[n] for n in names])
             for request, names in _REQUESTS]
    return cases[:num] if num is not None else cases


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,), "null": (type(None),),
}


def _type_ok(value: Any, schema: Mapping[str, Any]) -> bool:
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    if types and not any(t in _JSON_TYPES and isinstance(value, _JSON_TYPES[t])
                         and not (t in ("integer", "number") and isinstance(value, bool)) for t in types):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        return all(_type_ok(v, items) for v in value)
    return True


def validate_arguments(arguments: str, parameters: Mapping[str, Any]) -> str | None:
    """None if ``arguments`` (a JSON string) is valid for the ``parameters`` schema, else the reason."""
    try:
        args = json.loads(arguments)
    except ValueError as exc:
        return f"arguments are not JSON: {exc}"
    if not isinstance(args, dict):
        return "arguments are not a JSON object"
    props = parameters.get("properties") or {}
    missing = [r for r in parameters.get("required") or [] if r not in args]
    if missing:
        return f"missing required parameter(s) {missing}"
    unknown = [k for k in args if k not in props]
    if unknown:
        return f"unknown parameter(s) {unknown}"
    bad = [k for k, v in args.items() if not _type_ok(v, props[k])]
    return f"parameter(s) {bad} of the wrong type or value" if bad else None


def is_wellformed(text: str, tools: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    """(well-formed, reason) for one model output and the tools it was offered."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    _, calls = parse_tool_calls(text, tools)
    if not calls:
        return False, "no tool call"
    for call in calls:
        name = call["function"]["name"]
        if name not in by_name:
            return False, f"unknown tool {name!r}"
        why = validate_arguments(call["function"]["arguments"], by_name[name].get("parameters") or {})
        if why:
            return False, f"{name}: {why}"
    return True, "ok"


def tool_call_wellformed_rate(llm: Any, cases: Sequence[ToolCase] | None = None, max_tokens: int = 256,
                              chat_template: str | None = None) -> dict[str, Any]:
    """Fraction of ``cases`` (default: all built-in ones) answered with well-formed tool calls."""
    from qwen3coder.engine import SamplingParams

    cases = list(cases if cases is not None else default_cases())
    if not cases:
        raise ValueError("tool-call eval: no cases")
    tokenizer = llm.get_tokenizer()
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("tool-call eval needs a chat template (the checkpoint's tokenizer has none)")
    prompts = [render_chat(template, c.messages, tools=c.tools, add_generation_prompt=True) for c in cases]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    verdicts = [is_wellformed(o.outputs[0].text, c.tools) for c, o in zip(cases, outs)]
    reasons: dict[str, int] = {}
    for ok, why in verdicts:
        key = "ok" if ok else why.split(":")[0] if why.startswith(("no ", "unknown")) else "invalid arguments"
        reasons[key] = reasons.get(key, 0) + 1
    return {"rate": sum(ok for ok, _ in verdicts) / len(verdicts), "cases": len(verdicts), "outcomes": reasons}
