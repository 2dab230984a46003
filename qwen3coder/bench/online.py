"""Online throughput through the real server: N streaming requests at a fixed concurrency.

The benchmark's engine is served by the same FastAPI app as `qwen3coder serve` (in-process, loopback,
free port); clients stream `/v1/completions` with token-id prompts and `ignore_eos`, so every request
produces exactly `output_len` tokens. Reported: request/s, output and total tokens/s, and
time-to-first-token percentiles as the clients see them (HTTP and streaming included).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import torch


async def _one(client: Any, url: str, model: str, prompt: list[int], output_len: int) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != output_len:
        raise RuntimeError(f"a request produced {tokens} tokens instead of {output_len}")
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


async def _clients(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int
                   ) -> tuple[float, list[float], int]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def run(p: list[int]) -> tuple[float, int]:
            async with sem:
                return await _one(client, url, model, p, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        elapsed = time.perf_counter() - t0
    return elapsed, [r[0] for r in results], sum(r[1] for r in results)


def online_throughput(llm: Any, vocab: int, num_prompts: int, input_len: int, output_len: int,
                      concurrency: int) -> dict[str, float]:
    """Serve `llm`'s engine and measure streaming clients at `concurrency` (the engine is shut down after)."""
    from qwen3coder.cli import build_parser
    from qwen3coder.engine.async_engine import AsyncLLMEngine
    from qwen3coder.server.launcher import LocalServer

    args = build_parser().parse_args(["serve", "--served-model-name", "bench", "--disable-access-log"])
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, vocab, (input_len,), generator=g).tolist() for _ in range(num_prompts)]
    warm = [torch.randint(0, vocab, (input_len,), generator=g).tolist() for _ in range(2 * concurrency)]
    with LocalServer(args, engine=AsyncLLMEngine(llm.llm_engine)) as server:
        # warm-up with the load's shapes (other prompts, 4 tokens each): the mixed prefill + decode steps
        # of the first requests compile Triton kernels for new specialisations, a start-up cost
        _clients_in_subprocess(server.url, "bench", warm, 4, concurrency)
        elapsed, ttfts, out_tokens = _clients_in_subprocess(server.url, "bench", prompts, output_len, concurrency)
    ttfts.sort()
    return {
        "online_concurrency": concurrency,
        "online_requests": num_prompts,
        "online_request_s": round(num_prompts / elapsed, 3),
        "online_output_tok_s": round(out_tokens / elapsed, 1),
        "online_total_tok_s": round((out_tokens + num_prompts * input_len) / elapsed, 1),
        "online_ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
        "online_ttft_ms_p99": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
    }


def _clients_in_subprocess(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int
                           ) -> tuple[float, list[float], int]:
    """Run the streaming clients in another Python process: parsing every token's SSE chunk must not
    compete with the server and the engine for this process's GIL (a real client is elsewhere)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"url": url, "model": model, "prompts": prompts, "output_len": output_len,
                   "concurrency": concurrency}, f)
    try:
        r = subprocess.run([sys.executable, "-m", "qwen3coder.bench.online", f.name], capture_output=True,
                           text=True, timeout=1800)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"online clients failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["elapsed"], out["ttfts"], out["tokens"]


if __name__ == "__main__":  # the client process of `_clients_in_subprocess`
    import sys

    with open(sys.argv[1]) as f:
        job = json.load(f)
    elapsed, ttfts, tokens = asyncio.run(_clients(job["url"], job["model"], job["prompts"], job["output_len"],
                                                  job["concurrency"]))
    print(json.dumps({"elapsed": elapsed, "ttfts": ttfts, "tokens": tokens}))
