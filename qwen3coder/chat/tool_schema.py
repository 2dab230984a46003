"""Schema-typed conversion of Qwen3-Coder tool-call parameter values.

The model writes every ``<parameter=NAME>`` value as raw text; this module turns that text into
the JSON value the OpenAI ``arguments`` object should hold, following the current vLLM
``qwen3_coder`` rules (see docs/PROMPT_FORMATS.md):

1. a parameter the tool's ``properties`` do not list stays a raw string;
2. the type is ``str(schema["type"]).strip().lower()`` (so a list type renders as
   ``"['integer', 'null']"`` and falls through to the generic fallback); no ``type`` but an
   ``anyOf`` -> the first non-null member's type, nullable if a ``{"type": "null"}`` member exists;
3. nullable schemas map ``null``/``None`` (any case) to null; string types keep the text;
   non-string types map ``null``/``None`` to null;
4. ``int*``/``uint*``/``long*``/``short*``/``unsigned*`` -> ``int``; ``num*``/``float*`` -> float,
   integral floats become ints (``3.0`` -> 3); ``boolean``/``bool``/``binary`` -> ``== "true"``;
5. object/array/dict*/list* -> ``json.loads`` (a decoded string is ``ast.literal_eval``-ed again:
   double-encoded Python repr); otherwise / on failure ``ast.literal_eval``; otherwise the string.

Unlike vLLM, a converted value that is not strict JSON (NaN, infinity, sets, bytes, complex...)
falls back to the raw string, so ``arguments`` is always valid JSON.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "tool_properties",
    "convert_param_value",
    "streams_as_raw_string",
    "normalize_tools",
]

_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_NULL_WORDS = frozenset({"null", "none"})


def normalize_tools(tools: Sequence[Any] | None) -> dict[str, dict[str, Any]]:
    """Map function name -> its ``properties`` schema dict from OpenAI tool definitions.

    Accepts ``{"type": "function", "function": {...}}`` dicts or bare function dicts; the first
    definition of a name wins. Raises ``TypeError`` for a non-list or a non-dict tool.
    """
    if tools is None:
        return {}
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of OpenAI tool objects, got {type(tools).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump()
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TypeError(f"tools[{i}] has no function name")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        out.setdefault(fn["name"], dict(props) if isinstance(props, Mapping) else {})
    return out


def tool_properties(tools: Mapping[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The ``properties`` of function ``name`` ({} when unknown or untyped)."""
    return tools.get(name, {})


def _type_info(schema: Any) -> tuple[str, bool]:
    """(normalised type string, nullable) of one property schema."""
    if isinstance(schema, Mapping) and "type" in schema:
        ptype = str(schema["type"]).strip().lower()
        return ptype, ptype == "null"
    if isinstance(schema, Mapping) and "anyOf" in schema:
        ptype, nullable, picked = "string", False, False
        options = schema["anyOf"] if isinstance(schema["anyOf"], Sequence) else []
        for option in options:
            if isinstance(option, Mapping) and "type" in option:
                otype = str(option["type"]).strip().lower()
                if otype == "null":
                    nullable = True
                elif not picked:
                    ptype, picked = otype, True
        return ptype, nullable
    return "string", False


def streams_as_raw_string(name: str, props: Mapping[str, Any]) -> bool:
    """True when the converted value is always the raw text (so it can be streamed as it comes)."""
    if name not in props:
        return True
    ptype, nullable = _type_info(props[name])
    return ptype in _STRING_TYPES and not nullable


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _literal_eval(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(text) from None


def _convert(value: str, ptype: str) -> Any:
    if ptype.startswith(_INT_PREFIXES):
        try:
            return int(value)
        except ValueError:
            return value
    if ptype.startswith(("num", "float")):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number.is_integer() else number
    if ptype in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    container = ptype in ("object", "array", "arr") or ptype.startswith(("dict", "list"))
    if container:
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(parsed, str):
                try:
                    parsed = _literal_eval(parsed)
                except ValueError:
                    pass
            return parsed
    try:
        parsed = _literal_eval(value)
    except ValueError:
        return value
    if container and isinstance(parsed, str):
        try:
            parsed = _literal_eval(parsed)
        except ValueError:
            pass
    return parsed


def convert_param_value(value: str, name: str, props: Mapping[str, Any]) -> Any:
    """Convert raw parameter text ``value`` using the schema ``props[name]`` (rules above)."""
    if name not in props:
        return value
    ptype, nullable = _type_info(props[name])
    if nullable and value.lower() in _NULL_WORDS:
        return None
    if ptype in _STRING_TYPES:
        return value
    if value.lower() in _NULL_WORDS:
        return None
    converted = _convert(value, ptype)
    if isinstance(converted, tuple):
        converted = list(converted)
    return converted if _json_safe(converted) else value
