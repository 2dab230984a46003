"""A small stdlib HTTP client for the server (what `qwen3coder chat` and `complete` use).

`APIClient.stream_chat` posts a streaming chat completion and yields `ChatEvent`s parsed from the
server-sent events; `APIClient.complete` runs a (FIM) text completion. Errors from the server
become `ClientError` with the server's message; a server that cannot be reached says so.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator


class ClientError(Exception):
    """The server refused the request or could not be reached."""


@dataclass
class ChatEvent:
    kind: str  # "content" | "tool_call" (header) | "tool_args" | "finish" | "usage"
    text: str = ""
    index: int = 0
    data: dict[str, Any] = field(default_factory=dict)


class APIClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", "replace")
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw[:500]
            raise ClientError(f"server answered {e.code}: {msg}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach the server at {self.base_url}: {reason}") from e

    def models(self) -> list[str]:
        with self._request("/v1/models") as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]

    def _events(self, resp: Any) -> Iterator[dict[str, Any]]:
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if "error" in event:
                raise ClientError(f"server error: {event['error'].get('message')}")
            yield event

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[ChatEvent]:
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
        with self._request("/v1/chat/completions", body) as resp:
            for event in self._events(resp):
                if event.get("usage") and not event.get("choices"):
                    yield ChatEvent("usage", data=event["usage"])
                for choice in event.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield ChatEvent("content", delta["content"], choice["index"])
                    for call in delta.get("tool_calls") or []:
                        fn = call.get("function") or {}
                        if call.get("id"):
                            yield ChatEvent("tool_call", fn.get("name", ""), call["index"],
                                            {"id": call["id"]})
                        if fn.get("arguments"):
                            yield ChatEvent("tool_args", fn["arguments"], call["index"])
                    if choice.get("finish_reason"):
                        yield ChatEvent("finish", choice["finish_reason"], choice["index"])

    def complete(self, prompt: str, suffix: str | None = None, **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, **params}
        if suffix is not None:
            body["suffix"] = suffix
        with self._request("/v1/completions", body) as resp:
            return json.loads(resp.read())
