"""The server through the official `openai` SDK: every endpoint, on real server processes.

`random` is `qwen3coder serve` on a random tiny checkpoint (real tokenizer and chat template);
`scripted` is the same server over the scripted model of tests/test_server_helpers.py, whose
replies are known, for tool calls, tool_choice, JSON mode and FIM.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.test_server_helpers import (DEFAULT_REPLY, FIM_REPLY, RANDOM_NAME, SCRIPTED_NAME, WEATHER_TOOL,
                                       WRITE_TOOL, get_server)

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def rnd():
    server = get_server("random")
    yield server
    assert server.alive(), server.log()


@pytest.fixture(scope="module")
def scr():
    server = get_server("scripted")
    yield server
    assert server.alive(), server.log()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def reassemble(stream) -> tuple[object, list]:
    state = ChatCompletionStreamState()
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            state.handle_chunk(chunk)
    return state.current_completion_snapshot, chunks  # (get_final_completion refuses "length")


# ------------------------------------------------------------------ random checkpoint
def test_models_health_and_model_card(rnd):
    c = client(rnd)
    ids = [m.id for m in c.models.list().data]
    assert ids == [RANDOM_NAME, "test-alias"]
    assert c.models.retrieve("test-alias").id == "test-alias"
    assert httpx.get(rnd.url + "/health").status_code == 200


def test_chat_non_stream_usage_logprobs_n_seed(rnd):
    c = client(rnd)
    out = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=6, n=2, seed=7, temperature=1.0,
                                    logprobs=True, top_logprobs=3,
                                    extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                                                "repetition_penalty": 1.1})
    assert len(out.choices) == 2 and [ch.index for ch in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    for ch in out.choices:
        assert ch.finish_reason == "length" and ch.message.role == "assistant"
        assert len(ch.logprobs.content) == 6
        for entry in ch.logprobs.content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0 and isinstance(entry.bytes, list)
    again = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=6, n=2, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                                                                   "repetition_penalty": 1.1})
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in out.choices]


def test_chat_max_completion_tokens_and_stop(rnd):
    c = client(rnd)
    out = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    full = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=8, temperature=0).choices[0]
    text = full.message.content
    if len(text.strip()) >= 2:  # stop at a piece of the greedy reply: the text ends right before it
        piece = text.strip()[-2:]
        cut = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=8, temperature=0, stop=[piece])
        assert cut.choices[0].finish_reason == "stop" and piece not in cut.choices[0].message.content


def test_chat_stream_with_usage(rnd):
    c = client(rnd)
    stream = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}, temperature=0)
    final, chunks = reassemble(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert final.choices[0].finish_reason == "length"
    non_stream = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=5, temperature=0)
    assert final.choices[0].message.content == non_stream.choices[0].message.content
    with_lp = c.chat.completions.create(model=RANDOM_NAME, messages=HELLO, max_tokens=5, stream=True, temperature=0,
                                        logprobs=True, top_logprobs=2)
    entries = [e for chunk in with_lp for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 for e in entries)


def test_completions_prompt_kinds_echo_logprobs(rnd):
    c = client(rnd)
    out = c.completions.create(model=RANDOM_NAME, prompt="def fib(n):", max_tokens=4, temperature=0, logprobs=2,
                               echo=True)
    ch = out.choices[0]
    assert ch.text.startswith("def fib(n):") and out.usage.completion_tokens == 4
    assert ch.logprobs.token_logprobs[0] is None and len(ch.logprobs.tokens) == out.usage.prompt_tokens + 4
    ids = httpx.post(rnd.url + "/tokenize", json={"prompt": "def fib(n):"}).json()["tokens"]
    by_ids = c.completions.create(model=RANDOM_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == ch.text[len("def fib(n):"):]
    batch = c.completions.create(model=RANDOM_NAME, prompt=["a", "b", "c"], max_tokens=2, n=2, temperature=0)
    assert sorted(x.index for x in batch.choices) == list(range(6)) and batch.usage.completion_tokens == 12
    batch_ids = c.completions.create(model=RANDOM_NAME, prompt=[[1, 2, 3], [4, 5]], max_tokens=2)
    assert len(batch_ids.choices) == 2 and batch_ids.usage.prompt_tokens == 5


def test_completions_stream_and_stop(rnd):
    c = client(rnd)
    stream = c.completions.create(model=RANDOM_NAME, prompt=["x = 1", "y = 2"], max_tokens=5, stream=True,
                                  temperature=0, stream_options={"include_usage": True})
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
        usage = chunk.usage or usage
    assert finishes == {0: "length", 1: "length"} and usage.completion_tokens == 10
    ref = c.completions.create(model=RANDOM_NAME, prompt="x = 1", max_tokens=5, temperature=0)
    assert texts[0] == ref.choices[0].text


def test_completions_suffix_fim(rnd):
    c = client(rnd)
    out = c.completions.create(model=RANDOM_NAME, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))",
                               max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens == len(httpx.post(rnd.url + "/tokenize", json={
        "prompt": "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))<|fim_middle|>"}).json()["tokens"])


def test_tokenize_detokenize(rnd):
    r = httpx.post(rnd.url + "/tokenize", json={"model": RANDOM_NAME, "prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 1024
    assert httpx.post(rnd.url + "/detokenize", json={"model": RANDOM_NAME, "tokens": r["tokens"]}).json() == \
        {"prompt": "hello world"}
    chat = httpx.post(rnd.url + "/tokenize", json={"messages": HELLO, "tools": [WEATHER_TOOL],
                                                   "add_generation_prompt": True}).json()
    text = httpx.post(rnd.url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\n") and "get_weather" in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_metrics_exposition(rnd):
    client(rnd).completions.create(model=RANDOM_NAME, prompt="z", max_tokens=3)
    text = httpx.get(rnd.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_count", "http_requests_total"):
        assert f"qwen3coder:{name}" in text, name
    m = rnd.metrics()
    assert m["qwen3coder:generation_tokens_total"] >= 3 and m["qwen3coder:time_to_first_token_seconds_count"] >= 1


# ------------------------------------------------------------------ scripted model: tools, JSON, FIM
def test_tool_call_non_stream_and_tool_result_turn(scr):
    c = client(scr)
    msgs = [{"role": "user", "content": "what's the weather?"}]
    out = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL, WRITE_TOOL])
    ch = out.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    msgs += [ch.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    follow = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL])
    assert follow.choices[0].message.content == "The weather in Paris is sunny."
    assert follow.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_streamed_and_reassembled(scr):
    c = client(scr)
    msgs = [{"role": "user", "content": "weather in Paris and Tokyo"}]
    final, chunks = reassemble(c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL],
                                                         stream=True))
    ch = final.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check both.\n"
    assert [json.loads(t.function.arguments) for t in ch.message.tool_calls] == \
        [{"city": "Paris", "days": 3}, {"city": "Tokyo", "days": 1}]
    headers = [tc for chunk in chunks for x in chunk.choices for tc in (x.delta.tool_calls or []) if tc.id]
    assert [h.index for h in headers] == [0, 1] and all(h.function.name == "get_weather" for h in headers)
    assert all(h.function.arguments == "" for h in headers)
    non_stream = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL])
    assert [t.function.arguments for t in non_stream.choices[0].message.tool_calls] == \
        [t.function.arguments for t in ch.message.tool_calls]
    single = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL],
                                       parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_streamed_file_content_argument(scr):
    c = client(scr)
    final, _ = reassemble(c.chat.completions.create(
        model=SCRIPTED_NAME, messages=[{"role": "user", "content": "write a file"}], tools=[WRITE_TOOL], stream=True))
    args = json.loads(final.choices[0].message.tool_calls[0].function.arguments)
    assert args == {"path": "src/app.py", "content": 'def main():\n    print("hi")'}


def test_tool_choice_none_named_required(scr):
    c = client(scr)
    msgs = [{"role": "user", "content": "what's the weather?"}]
    none = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content
    hello = [{"role": "user", "content": "hello there"}]  # the script would answer in prose...
    named = c.chat.completions.create(model=SCRIPTED_NAME, messages=hello, tools=[WEATHER_TOOL, WRITE_TOOL],
                                      tool_choice={"type": "function", "function": {"name": "write_file"}})
    calls = named.choices[0].message.tool_calls  # ...but the prefill forces the named call
    assert len(calls) == 1 and calls[0].function.name == "write_file" and named.choices[0].finish_reason == "tool_calls"
    required = c.chat.completions.create(model=SCRIPTED_NAME, messages=msgs, tools=[WRITE_TOOL, WEATHER_TOOL],
                                         tool_choice="required")
    call = required.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    forced = c.chat.completions.create(model=SCRIPTED_NAME, messages=hello, tools=[WRITE_TOOL, WEATHER_TOOL],
                                       tool_choice="required")
    assert forced.choices[0].message.tool_calls[0].function.name in ("write_file", "get_weather")
    final, _ = reassemble(c.chat.completions.create(
        model=SCRIPTED_NAME, messages=msgs, tools=[WEATHER_TOOL, WRITE_TOOL], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}


def test_plain_reply_stream_and_n(scr):
    c = client(scr)
    final, chunks = reassemble(c.chat.completions.create(model=SCRIPTED_NAME, messages=HELLO, stream=True, n=2))
    assert [ch.message.content for ch in final.choices] == [DEFAULT_REPLY, DEFAULT_REPLY]
    assert all(ch.finish_reason == "stop" for ch in final.choices)
    firsts = {}
    for chunk in chunks:
        for ch in chunk.choices:
            firsts.setdefault(ch.index, ch.delta)
    assert {i: d.role for i, d in firsts.items()} == {0: "assistant", 1: "assistant"}
    stop = c.chat.completions.create(model=SCRIPTED_NAME, messages=[{"role": "user", "content": "stop test"}],
                                     stop=["STOP"])
    assert stop.choices[0].message.content == "alpha beta " and stop.choices[0].finish_reason == "stop"


def test_response_format_json_object(scr):
    c = client(scr)
    out = c.chat.completions.create(model=SCRIPTED_NAME, messages=[{"role": "user", "content": "json please"}],
                                    response_format={"type": "json_object"})
    assert json.loads(out.choices[0].message.content) == {"answer": 42, "ok": True}
    bad = c.chat.completions.create(model=SCRIPTED_NAME, messages=[{"role": "user", "content": "no json"}],
                                    response_format={"type": "json_object"})
    assert bad.choices[0].message.content == "I will not write JSON."  # retried, then returned as it is
    text = c.chat.completions.create(model=SCRIPTED_NAME, messages=[{"role": "user", "content": "json please"}],
                                     response_format={"type": "text"}).choices[0].message.content
    assert text.startswith("Sure:")


def test_fim_suffix_completion(scr):
    c = client(scr)
    out = c.completions.create(model=SCRIPTED_NAME, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=30)
    assert out.choices[0].text == FIM_REPLY and out.choices[0].finish_reason == "stop"
    stream = c.completions.create(model=SCRIPTED_NAME, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=30,
                                  stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == FIM_REPLY
