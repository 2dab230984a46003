"""Concurrency and disconnects on a real server process: 64 concurrent streams all complete, and
clients that leave mid-stream (or mid non-streaming request) leave no request running and no KV
block held, as /metrics shows."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.test_server_helpers import RANDOM_NAME, get_server


@pytest.fixture(scope="module")
def rnd():
    server = get_server("random")
    yield server
    assert server.alive(), server.log()


def _wait_idle(server, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["qwen3coder:num_requests_running"] == 0 and m["qwen3coder:num_requests_waiting"] == 0
                and m["qwen3coder:num_kv_blocks_used"] == 0):
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.2)


def test_64_concurrent_streams(rnd):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str]:
        stream = await client.chat.completions.create(
            model=RANDOM_NAME, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8, stream=True,
            temperature=0.8, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, used = "", None, 0
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, used, finish

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=rnd.base_url, api_key="x", max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100),
                                                                    timeout=300)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == 64 and all(used == 8 and finish == "length" for _, used, finish in results), results
    assert time.monotonic() - t0 < 120
    _wait_idle(rnd)


def test_disconnects_free_kv_blocks(rnd):
    body = {"model": RANDOM_NAME, "messages": [{"role": "user", "content": "write a long story"}],
            "max_tokens": 900, "stream": True, "ignore_eos": True}

    async def leave_after_chunks(client: httpx.AsyncClient, n: int) -> int:
        got = 0
        async with client.stream("POST", rnd.base_url + "/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    got += 1
                    if got >= n:
                        break  # leaving the block closes the connection mid-stream
        return got

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            got = await asyncio.gather(*(leave_after_chunks(client, 3 + i % 5) for i in range(12)))
            assert all(g >= 3 for g in got)
        # a non-streaming client that gives up (read timeout) is noticed too
        async with httpx.AsyncClient(timeout=1.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(rnd.base_url + "/completions",
                                  json={"model": RANDOM_NAME, "prompt": "x", "max_tokens": 900, "ignore_eos": True})

    before = rnd.metrics()["qwen3coder:generation_tokens_total"]
    asyncio.run(main())
    m = _wait_idle(rnd, timeout=30)
    # nowhere near 13 × 900 tokens were generated: the requests were aborted, not run to the end
    assert m["qwen3coder:generation_tokens_total"] - before < 13 * 900 / 2
    out = openai.OpenAI(base_url=rnd.base_url, api_key="x").completions.create(model=RANDOM_NAME, prompt="ok",
                                                                              max_tokens=2)
    assert out.usage.completion_tokens == 2
