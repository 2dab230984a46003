"""Bad input never crashes or hangs the server: each case gets a 4xx with an OpenAI error body, and the
server answers /health afterwards. Also: the API key (401), unknown routes (404), wrong methods (405)
and a full queue (503)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.test_server_helpers import RANDOM_NAME, WEATHER_TOOL, ServerProcess, get_server, tiny_checkpoint

M = RANDOM_NAME
MSG = [{"role": "user", "content": "hi"}]
CHAT, COMP = "/v1/chat/completions", "/v1/completions"


def _nested(depth: int) -> str:
    return '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "tools": %s1%s}' % (
        M, "[" * depth, "]" * depth)


# (name, route, body: dict -> sent as JSON | bytes -> sent raw, expected status, expected param or None)
CASES = [
    ("malformed json", CHAT, b'{"model": "x", "messages": [', 400, None),
    ("not an object", CHAT, b'[1, 2, 3]', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("invalid utf-8", CHAT, b'{"model": "\xff\xfe", "messages": []}', 400, None),
    ("deeply nested json", CHAT, _nested(100_000).encode(), 400, None),
    ("nested json over the depth limit", CHAT, _nested(200).encode(), 400, None),
    ("missing messages", CHAT, {"model": M}, 400, "messages"),
    ("empty messages", CHAT, {"model": M, "messages": []}, 400, "messages"),
    ("messages not a list", CHAT, {"model": M, "messages": "hi"}, 400, "messages"),
    ("bad role", CHAT, {"model": M, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("content wrong type", CHAT, {"model": M, "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("user without content", CHAT, {"model": M, "messages": [{"role": "user"}]}, 400, None),
    ("image content part", CHAT, {"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("temperature as string", CHAT, {"model": M, "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", CHAT, {"model": M, "messages": MSG, "temperature": 7}, 400, "temperature"),
    ("top_p zero", CHAT, {"model": M, "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("max_tokens zero", CHAT, {"model": M, "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", CHAT, {"model": M, "messages": MSG, "max_completion_tokens": -5}, 400, None),
    ("max_tokens a float", CHAT, {"model": M, "messages": MSG, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens beyond context", CHAT, {"model": M, "messages": MSG, "max_tokens": 10**6}, 400, "max_tokens"),
    ("absurd n", CHAT, {"model": M, "messages": MSG, "n": 10**9}, 400, "n"),
    ("n zero", CHAT, {"model": M, "messages": MSG, "n": 0}, 400, "n"),
    ("n a bool", CHAT, {"model": M, "messages": MSG, "n": True}, 400, "n"),
    ("top_logprobs too many", CHAT, {"model": M, "messages": MSG, "logprobs": True, "top_logprobs": 99}, 400, None),
    ("top_logprobs without logprobs", CHAT, {"model": M, "messages": MSG, "top_logprobs": 2}, 400, None),
    ("presence_penalty range", CHAT, {"model": M, "messages": MSG, "presence_penalty": 3}, 400, None),
    ("stop wrong type", CHAT, {"model": M, "messages": MSG, "stop": 5}, 400, "stop"),
    ("too many stops", CHAT, {"model": M, "messages": MSG, "stop": ["a"] * 50}, 400, "stop"),
    ("empty stop string", CHAT, {"model": M, "messages": MSG, "stop": [""]}, 400, "stop"),
    ("seed a string", CHAT, {"model": M, "messages": MSG, "seed": "abc"}, 400, "seed"),
    ("seed huge", CHAT, {"model": M, "messages": MSG, "seed": 10**30}, 400, "seed"),
    ("stream a string", CHAT, {"model": M, "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", CHAT, {"model": M, "messages": MSG,
                                             "stream_options": {"include_usage": True}}, 400, None),
    ("over-long prompt", CHAT, {"model": M, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, None),
    ("tool schema not an object", CHAT, {"model": M, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "nope"}}]}, 400, None),
    ("tool schema of type string", CHAT, {"model": M, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400, None),
    ("tool with a bad name", CHAT, {"model": M, "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "has space"}}]}, 400, None),
    ("tool without function", CHAT, {"model": M, "messages": MSG, "tools": [{"type": "function"}]}, 400, None),
    ("duplicate tools", CHAT, {"model": M, "messages": MSG, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, None),
    ("unknown tool in tool_choice", CHAT, {"model": M, "messages": MSG, "tools": [WEATHER_TOOL],
                                           "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, None),
    ("tool_choice required without tools", CHAT, {"model": M, "messages": MSG, "tool_choice": "required"},
     400, None),
    ("tool_choice unknown string", CHAT, {"model": M, "messages": MSG, "tools": [WEATHER_TOOL],
                                          "tool_choice": "always"}, 400, None),
    ("bad tool_call arguments", CHAT, {"model": M, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]}]}, 400, None),
    ("response_format unknown", CHAT, {"model": M, "messages": MSG, "response_format": {"type": "xml"}}, 400, None),
    ("logit_bias", CHAT, {"model": M, "messages": MSG, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("nan temperature", CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                              b'"temperature": NaN}' % M.encode(), 400, "temperature"),
    ("completion empty prompt", COMP, {"model": M, "prompt": ""}, 400, "prompt"),
    ("completion empty list", COMP, {"model": M, "prompt": []}, 400, None),
    ("completion token id out of vocab", COMP, {"model": M, "prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("completion negative token id", COMP, {"model": M, "prompt": [1, -2]}, 400, None),
    ("completion mixed prompt list", COMP, {"model": M, "prompt": ["a", 5]}, 400, None),
    ("completion logprobs too many", COMP, {"model": M, "prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("completion suffix with FIM token", COMP, {"model": M, "prompt": "a", "suffix": "<|fim_middle|>"}, 400,
     "suffix"),
    ("completion best_of", COMP, {"model": M, "prompt": "a", "best_of": 3}, 400, None),
    ("completion too many prompts", COMP, {"model": M, "prompt": ["a"] * 100}, 400, "prompt"),
    ("tokenize bad type", "/tokenize", {"prompt": 5}, 400, "prompt"),
    ("detokenize out of vocab", "/detokenize", {"tokens": [10**8]}, 400, "tokens"),
    ("detokenize unknown model", "/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
]


@pytest.fixture(scope="module")
def rnd():
    server = get_server("random")
    yield server
    assert server.alive(), server.log()


@pytest.mark.parametrize("name,route,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(rnd, name, route, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(rnd.url + route, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(rnd.url + route, json=body, timeout=60)
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in err["message"]
    assert httpx.get(rnd.url + "/health", timeout=30).status_code == 200


def test_routes_and_methods(rnd):
    r = httpx.get(rnd.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(rnd.url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = httpx.delete(rnd.url + "/v1/models")
    assert r.status_code == 405
    r = httpx.get(rnd.url + "/v1/models/unknown-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(CASES) >= 30


def test_api_key_and_full_queue(tmp_path):
    ckpt = tiny_checkpoint()
    server = ServerProcess(["--model", str(ckpt), "--device", "cpu", "--max-model-len", "512", "--api-key", "sekrit",
                            "--max-num-seqs", "1", "--max-queue", "1", "--served-model-name", "m"])
    try:
        body = {"model": "m", "prompt": "a", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.post(server.url + COMP, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sekrit"}
        assert httpx.post(server.url + COMP, json=body, headers=auth).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # open
        assert httpx.get(server.url + "/metrics").status_code == 200
        # one seat, one waiting place: with two long requests in the engine the third is refused
        long = {"model": "m", "prompt": "a", "max_tokens": 400, "extra": 1, "ignore_eos": True}
        results: list[int] = []

        def post() -> None:
            results.append(httpx.post(server.url + COMP, json=long, headers=auth, timeout=300).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(1.0)
        r = httpx.post(server.url + COMP, json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        for t in threads:
            t.join()
        assert results == [200, 200]
        assert httpx.post(server.url + COMP, json=body, headers=auth).status_code == 200
    finally:
        server.stop()
