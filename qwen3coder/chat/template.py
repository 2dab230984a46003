"""Chat-template rendering (OpenAI messages -> prompt string).

The Jinja environment reproduces transformers' ``apply_chat_template`` environment:
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols``
extension, ``tojson`` overridden by ``json.dumps(ensure_ascii=False)`` (accepting ``indent``,
``separators``, ``sort_keys``, ``ensure_ascii``), and the ``raise_exception`` / ``strftime_now``
globals. Compiled templates are cached by template text.

``normalize_messages`` turns OpenAI chat messages into what the Qwen3-Coder templates expect:
``tool_calls[].function.arguments`` JSON strings become dicts, content-part lists become a string
(text parts joined with ``"\\n"``, as vLLM does), ``None`` content becomes ``""``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplateError",
    "render_chat",
    "normalize_messages",
    "compile_chat_template",
    "resolve_chat_template",
    "load_chat_template",
]


class ChatTemplateError(ValueError):
    """A chat template is missing, unreadable, or failed to render."""


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` in the transformers-equivalent sandbox (cached)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc


def _content_to_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ValueError(f"messages[{index}].content[{j}] must be an object, got {type(part).__name__}")
            kind = part.get("type", "text")
            if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{index}].content[{j}] has unsupported type {kind!r}; "
                    "only text parts are supported by this text-only model"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(
        f"messages[{index}].content must be a string, a list of parts or null, got {type(content).__name__}"
    )


def _normalize_tool_call(call: Any, index: int, k: int) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"messages[{index}].tool_calls[{k}] must be an object, got {type(call).__name__}")
    out = dict(call)
    fn = call.get("function")
    if fn is None:
        return out
    if not isinstance(fn, Mapping):
        raise ValueError(f"messages[{index}].tool_calls[{k}].function must be an object")
    fn = dict(fn)
    if "arguments" in fn:
        args = fn["arguments"]
        if args is None or (isinstance(args, str) and not args.strip()):
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"messages[{index}].tool_calls[{k}].function.arguments is not valid JSON ({exc.msg} at "
                    f"position {exc.pos}): {fn['arguments'][:200]!r}"
                ) from exc
        if not isinstance(args, Mapping):
            raise ValueError(
                f"messages[{index}].tool_calls[{k}].function.arguments must be a JSON object, got {type(args).__name__}"
            )
        fn["arguments"] = dict(args)
    out["function"] = fn
    return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return template-ready copies of OpenAI chat ``messages`` (the input is not modified)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no valid 'role'")
        msg = dict(message)
        msg["content"] = _content_to_text(message.get("content"), i)
        calls = message.get("tool_calls")
        if calls is not None:
            if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
                raise ValueError(f"messages[{i}].tool_calls must be a list")
            msg["tool_calls"] = [_normalize_tool_call(c, i, k) for k, c in enumerate(calls)]
        out.append(msg)
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    normalize: bool = True,
    **kwargs: Any,
) -> str:
    """Render ``messages`` (and ``tools``) with ``template`` like transformers' ``apply_chat_template``.

    ``normalize`` (default) runs ``normalize_messages`` first; extra ``kwargs`` become template
    variables (e.g. ``documents``, ``enable_thinking``).
    """
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("no chat template given; use completions or pass --chat-template")
    if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence)):
        raise ValueError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    msgs = normalize_messages(messages) if normalize else list(messages)
    compiled = compile_chat_template(template)
    kwargs.setdefault("documents", None)
    try:
        return compiled.render(
            messages=msgs,
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template rendering failed: {exc}") from exc


def load_chat_template(value: str | Path) -> str:
    """A ``--chat-template`` value: a path to a template file, or the template text itself."""
    text = str(value)
    if "{{" in text or "{%" in text:
        return text
    path = Path(text)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ChatTemplateError(f"chat template {text!r} is neither a readable file nor Jinja template text")


def resolve_chat_template(tokenizer: Any, override: str | Path | None = None, source: str | None = None) -> str:
    """The template to use: ``override`` (path or text) if given, else the tokenizer's own.

    Raises ``ChatTemplateError`` naming ``source`` (e.g. the checkpoint path) if there is none.
    """
    if override is not None:
        return load_chat_template(override)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    name = source or "this checkpoint"
    raise ChatTemplateError(f"{name} has no chat template; use completions or pass --chat-template")
