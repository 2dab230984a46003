"""`response_format` of type `json_object` / `json_schema`: instruction plus validation.

The engine has no constrained decoding, so JSON mode works in two parts:

1. **Instruction.** A system instruction asks for a single JSON object and nothing else (with the
   schema, for `json_schema`). It is appended to the first system message, or becomes one.
2. **Validation and extraction** (non-streaming). The reply is checked with `json.loads`; if it
   is not JSON as a whole, the first JSON object or array inside it is taken (models like to
   wrap JSON in a ```json fence or a sentence). The extracted JSON becomes the message content.
   If no JSON can be found, the server retries up to `JSON_ATTEMPTS` times in all (sampling
   again), then returns the last reply unchanged, with `finish_reason` kept and a warning logged.
   A streamed reply cannot be taken back, so streaming only gets the instruction; the client
   sees the raw text (`extract_json` is what a client can apply).
"""

from __future__ import annotations

import json
from typing import Any

JSON_ATTEMPTS = 3

_INSTRUCTION = ("Respond with a single valid JSON object and nothing else: no prose, no explanation, "
                "no Markdown code fences.")


def json_instruction(response_format: Any) -> str:
    text = _INSTRUCTION
    schema = getattr(response_format, "json_schema", None)
    if getattr(response_format, "type", None) == "json_schema" and schema:
        body = schema.get("schema", schema)
        text += " The JSON must conform to this JSON schema:\n" + json.dumps(body, ensure_ascii=False)
    return text


def add_json_instruction(messages: list[dict[str, Any]], response_format: Any) -> list[dict[str, Any]]:
    """A copy of `messages` with the JSON instruction in the (first) system message."""
    instruction = json_instruction(response_format)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{instruction}"
    else:
        out.insert(0, {"role": "system", "content": instruction})
    return out


def extract_json(text: str) -> str | None:
    """The JSON value in `text` (the whole text, or its first object/array), compact; None if none."""
    stripped = text.strip()
    try:
        return json.dumps(json.loads(stripped), ensure_ascii=False)
    except (json.JSONDecodeError, RecursionError):
        pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(stripped):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(stripped, i)
            except (json.JSONDecodeError, RecursionError):
                continue
            return json.dumps(value, ensure_ascii=False)
    return None
