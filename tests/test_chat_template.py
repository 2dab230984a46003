"""Tests of qwen3coder.chat.template: golden renders, message normalisation, transformers parity."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from qwen3coder.chat.template import (
    ChatTemplateError,
    compile_chat_template,
    load_chat_template,
    normalize_messages,
    render_chat,
    resolve_chat_template,
)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
RENDERS = REF / "chat_template_renders"
TEMPLATES = {
    "vllm_example_v2": REF / "qwen3_coder_chat_template.jinja",
    "hf_tokenizer_config_v1": REF / "qwen3_coder_chat_template.hf_tokenizer_config_v1.jinja",
}
needs_ref = pytest.mark.skipif(
    not (RENDERS / "cases.json").is_file(),
    reason=f"Qwen3-Coder reference templates/renders not found under {REF} (they live beside the repo)",
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name"},
                "days": {"type": ["integer", "null"], "minimum": 1, "deprecated": False},
                "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
            },
            "required": ["city"],
        },
    },
}


def _cases() -> list[tuple[str, str]]:
    if not (RENDERS / "cases.json").is_file():
        return []
    cases = json.loads((RENDERS / "cases.json").read_text(encoding="utf-8"))
    return [(t, c) for t in TEMPLATES for c in cases]


@needs_ref
@pytest.mark.parametrize("template_name,case", _cases())
def test_golden_renders(template_name, case):
    cases = json.loads((RENDERS / "cases.json").read_text(encoding="utf-8"))
    inp = cases[case]
    template = TEMPLATES[template_name].read_text(encoding="utf-8")
    golden = (RENDERS / f"{template_name}__{case}.txt").read_text(encoding="utf-8")
    out = render_chat(
        template, inp["messages"], tools=inp.get("tools"), add_generation_prompt=inp["add_generation_prompt"]
    )
    assert out == golden


@needs_ref
@pytest.mark.parametrize("template_name", list(TEMPLATES))
def test_string_arguments_are_normalised(template_name):
    cases = json.loads((RENDERS / "cases.json").read_text(encoding="utf-8"))
    inp = copy.deepcopy(cases["tools_full_turn"])
    for call in inp["messages"][2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    original = copy.deepcopy(inp)
    template = TEMPLATES[template_name].read_text(encoding="utf-8")
    golden = (RENDERS / f"{template_name}__tools_full_turn.txt").read_text(encoding="utf-8")
    assert render_chat(template, inp["messages"], tools=inp["tools"]) == golden
    assert inp == original  # the caller's messages are not modified


def test_normalize_messages():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "ok"}]},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1, "y": "é"}'}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
                {"id": "c", "type": "function", "function": {"name": "h", "arguments": {"z": [1]}}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "42"}]},
    ]
    out = normalize_messages(msgs)
    assert out[0]["content"] == "be brief\nok"
    assert out[2]["content"] == ""
    assert [c["function"]["arguments"] for c in out[2]["tool_calls"]] == [{"x": 1, "y": "é"}, {}, {"z": [1]}]
    assert out[3] == {"role": "tool", "tool_call_id": "a", "content": "42"}
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"x": 1, "y": "é"}'


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], r"messages\[0\]"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": "[1]"}}]},
            ],
            r"messages\[1\]\.tool_calls\[0\].*JSON object",
        ),
        ([{"content": "no role"}], r"messages\[0\] has no valid 'role'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "unsupported type"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
        ("not a list", "list of message objects"),
    ],
)
def test_normalize_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


def test_environment_features():
    template = (
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m.content | tojson }}|{{ {'b': 1, 'a': 'é<>'} | tojson(sort_keys=True) }}"
        "|{{ [1, 2] | tojson(indent=2) }}|{{ {'k': 1} | tojson(separators=(',', ':')) }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    out = render_chat(template, [{"role": "skip", "content": "x"}, {"role": "user", "content": "日本 <b>"}])
    assert out == '"日本 <b>"|{"a": "é<>", "b": 1}|[\n  1,\n  2\n]|{"k":1}4'
    with pytest.raises(ChatTemplateError, match="boom"):
        render_chat("{{ raise_exception('boom') }}", [{"role": "user", "content": ""}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        compile_chat_template("{% if %}")
    assert compile_chat_template("{{ 1 }}") is compile_chat_template("{{ 1 }}")  # cached
    with pytest.raises(ChatTemplateError, match="unsafe"):  # the sandbox is immutable
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": ""}])


def test_missing_template_errors(tmp_path):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ChatTemplateError, match="/ckpt has no chat template; use completions or pass --chat-template"):
        resolve_chat_template(NoTemplate(), source="/ckpt")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat("", [{"role": "user", "content": "x"}])
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}", encoding="utf-8")
    assert resolve_chat_template(NoTemplate(), override=path) == "{{ messages[0].content }}"
    assert load_chat_template("{{ x }}") == "{{ x }}"
    with pytest.raises(ChatTemplateError, match="neither a readable file"):
        load_chat_template(tmp_path / "missing.jinja")
    assert issubclass(ChatTemplateError, ValueError)


EXTRA_CONVERSATIONS = [
    ([{"role": "user", "content": "hello"}], None, False),
    (
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ],
        [WEATHER],
        True,
    ),
    (
        [
            {"role": "user", "content": "w?"},
            {
                "role": "assistant",
                "content": "  checking  ",
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {
                                "city": "Paris",
                                "days": 3,
                                "flag": True,
                                "opt": None,
                                "list": ["a", {"b": "日本"}],
                            },
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
        [WEATHER],
        True,
    ),
    ([{"role": "tool", "content": "orphan tool result"}, {"role": "assistant", "content": "ok"}], None, True),
]


@needs_ref
@pytest.mark.parametrize("template_name", list(TEMPLATES))
def test_matches_transformers_apply_chat_template(template_name, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tok_dir = REF / "qwen3-coder-30b-a3b-instruct"
    d = tmp_path_factory.mktemp("hf_tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, d / name)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    template = TEMPLATES[template_name].read_text(encoding="utf-8")
    for messages, tools, gen in EXTRA_CONVERSATIONS:
        expected = hf.apply_chat_template(
            copy.deepcopy(messages), tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen
        )
        assert render_chat(template, messages, tools=tools, add_generation_prompt=gen) == expected
