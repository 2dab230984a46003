"""AsyncLLMEngine: streaming outputs as produced (delta and cumulative), concurrent requests,
abort (explicit and by leaving the iteration), the bounded queue, validation at call time, stats,
and an event loop that stays responsive while the model computes."""

from __future__ import annotations

import asyncio

import pytest

from qwen3coder.engine import AsyncLLMEngine, LLMEngine, QueueFullError, RequestOutputKind, SamplingParams
from tests.test_engine_helpers import assert_all_free, random_model, reference_greedy


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=5)


def make(model, **kw):
    args = dict(skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64, max_num_seqs=8)
    args.update(kw)
    max_waiting = args.pop("max_waiting_requests", None)
    return AsyncLLMEngine(LLMEngine.from_pretrained(model, **args), max_waiting_requests=max_waiting)


async def collect(stream):
    return [o async for o in stream]


def test_streaming_matches_greedy_and_abort(model):
    async def main():
        eng = make(model)
        try:
            prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
            delta = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            cum = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            s0 = eng.add_request("a", {"prompt_token_ids": prompts[0]}, delta)
            s1 = eng.add_request("b", {"prompt_token_ids": prompts[1]}, cum)
            s2 = eng.add_request("c", {"prompt_token_ids": prompts[2]},
                                 SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            t = asyncio.create_task(ticker())
            first_c = await s2.__anext__()
            eng.abort("c")
            r0, r1, rest_c = await asyncio.gather(collect(s0), collect(s1), collect(s2))
            t.cancel()
            assert sum((o.outputs[0].token_ids for o in r0), []) == reference_greedy(model, prompts[0], 8)
            assert len(r0) == 8 and all(len(o.outputs[0].token_ids) == 1 for o in r0)
            assert [len(o.outputs[0].token_ids) for o in r1] == list(range(1, 9))
            assert r1[-1].outputs[0].token_ids == reference_greedy(model, prompts[1], 8) and r1[-1].finished
            assert not first_c.finished and all(not o.finished for o in rest_c)
            assert ticks > 0  # the event loop ran while the engine worked
            # leaving a stream early aborts the request
            agen = eng.generate({"prompt_token_ids": [3, 3]},
                                SamplingParams(max_tokens=200, ignore_eos=True), "d")
            async for _ in agen:
                break
            await agen.aclose()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if not eng.engine.has_unfinished_requests():
                    break
            assert_all_free(eng.engine)
            stats = eng.get_stats()
            assert stats.generation_tokens_total > 0 and len(stats.ttft_seconds) >= 2
            assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_queue_full_and_validation(model):
    async def main():
        eng = make(model, max_waiting_requests=2)
        try:
            with pytest.raises(ValueError, match="max_tokens"):
                eng.add_request("bad", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=300))
            p = SamplingParams(max_tokens=4, ignore_eos=True)
            streams = [eng.add_request(f"q{i}", {"prompt_token_ids": [1, 2]}, p) for i in range(2)]
            with pytest.raises(QueueFullError):
                for i in range(2, 50):
                    streams.append(eng.add_request(f"q{i}", {"prompt_token_ids": [1, 2]}, p))
            with pytest.raises(ValueError, match="request_id"):
                eng.add_request("q0", {"prompt_token_ids": [1]}, p)
            outs = await asyncio.gather(*(collect(s) for s in streams))
            assert all(o[-1].finished and len(o[-1].outputs[0].token_ids) == 4 for o in outs)
        finally:
            eng.shutdown()

    asyncio.run(main())
