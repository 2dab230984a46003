"""A server over an engine without a tokenizer (`skip_tokenizer_init`, e.g. `qwen3coder bench`'s online
scenario on random weights): completions take token-id prompts, and a stream still delivers every token
as it is generated — each chunk carries the new `token_ids` (text is empty), instead of nothing until
the final chunk (which made the benchmark's time to first token equal the whole request). Also the
engine warm-up that `serve --warmup` runs before serving."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qwen3coder.cli import build_parser
from qwen3coder.engine import LLM
from qwen3coder.engine.async_engine import AsyncLLMEngine
from qwen3coder.server.launcher import LocalServer
from tests.test_engine_helpers import random_model


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tokenizer_less_stream_carries_token_ids(async_scheduling):
    """Also with async scheduling (the CUDA default) forced on: concurrent streams get every token."""
    llm = LLM(random_model("tiny"), device="cpu", skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=32,
              async_scheduling=async_scheduling)
    args = build_parser().parse_args(["serve", "--served-model-name", "m", "--disable-access-log"])
    body = {"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with LocalServer(args, engine=AsyncLLMEngine(llm.llm_engine)) as server:
        chunks = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        plain = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()

        def one(i: int) -> list[int]:
            req = {**body, "prompt": [5 + i, 6, 7], "max_tokens": 5 + i, "stream": False}
            return httpx.post(server.url + "/v1/completions", json=req, timeout=60).json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(4) as pool:  # concurrent requests: continuous batching (and lookahead)
            together = list(pool.map(one, range(4)))
        alone = [one(i) for i in range(4)]
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    assert len(choices) >= 2, "tokens must stream before the final chunk"
    assert all(c["text"] == "" for c in choices)
    streamed = [t for c in choices for t in c["token_ids"]]
    assert len(streamed) == 6 and choices[-1]["finish_reason"] == "length"
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["choices"][0]["token_ids"] == streamed  # greedy: the same tokens
    assert [len(t) for t in together] == [5, 6, 7, 8] and together == alone


def test_serve_warmup_flag(caplog):
    """`serve --warmup on` warms the engine up before it is handed to the server (auto: on a GPU only)."""
    import logging

    from qwen3coder.server.launcher import build_engine

    argv = ["serve", "--preset", "tiny", "--load-format", "dummy", "--device", "cpu", "--max-model-len", "128",
            "--num-kv-blocks", "64"]
    with caplog.at_level(logging.INFO, logger="qwen3coder.server"):
        engine = build_engine(build_parser().parse_args(argv + ["--warmup", "on"]))
    try:
        assert "warm-up done" in caplog.text
        assert engine.engine.get_stats().num_requests_finished == 0
    finally:
        engine.shutdown()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen3coder.server"):
        engine = build_engine(build_parser().parse_args(argv))  # auto on a CPU: no warm-up
    engine.shutdown()
    assert "warm-up" not in caplog.text
