"""Async scheduling (`EngineConfig.async_scheduling`): decode step n+1 is planned and launched before
step n's sampled tokens are read back. Forced on here (the CPU default is off), it must give exactly the
tokens of the synchronous engine under every sampling feature that reads earlier tokens (penalties,
seeds, min_tokens, stop tokens and strings, n > 1, logprobs), survive aborts and failures, and leave
every block free. Greedy equality with transformers under async scheduling is in test_engine_greedy.py.
"""

from __future__ import annotations

import pytest
import torch

from qwen3coder.engine import LLM, LLMEngine, SamplingParams
from qwen3coder.engine.sequence import hash_block
from tests.test_engine_helpers import ToyTokenizer, assert_all_free, random_model, run_engine

_g = torch.Generator().manual_seed(1)
PROMPTS = [torch.randint(2, 512, (n,), generator=_g).tolist() for n in (5, 17, 33, 3, 60, 9, 16)]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=12, stop_token_ids=list(range(2, 60))),
    SamplingParams(temperature=0.8, seed=3, max_tokens=25, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.2, logprobs=2),
    SamplingParams(temperature=1.0, seed=5, max_tokens=30, n=3),
    SamplingParams(temperature=0, max_tokens=40, min_tokens=10),
    SamplingParams(temperature=0.5, seed=9, top_k=5, top_p=0.9, max_tokens=33, repetition_penalty=1.2),
    SamplingParams(temperature=0.9, seed=11, max_tokens=18, stop=["ab", "q"], include_stop_str_in_output=True),
]


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=3)


def _llm(model, async_scheduling: bool, **kw) -> LLM:
    args = dict(tokenizer=ToyTokenizer(512, eos_token_id=1), device="cpu", max_model_len=256,
                num_kv_blocks=64, max_num_seqs=4, async_scheduling=async_scheduling)
    args.update(kw)
    return LLM(model, **args)


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in r.outputs] for r in outs]


def _count_lookahead(llm: LLM) -> list[int]:
    """Wrap the runner's launch to count the steps launched ahead (with a pending token)."""
    runner, counts = llm.llm_engine.runner, [0, 0]
    launch = runner.launch

    def counting(sched, prev=None):
        counts[prev is not None] += 1
        return launch(sched, prev)

    runner.launch = counting
    return counts


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_blocks=26, block_size=4), dict(max_num_batched_tokens=7)],
                         ids=["default", "tight_pool", "chunked"])
def test_async_equals_sync(model, kw):
    sync = _llm(model, False, **kw)
    ref = sync.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    llm = _llm(model, True, **kw)
    counts = _count_lookahead(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    assert _summary(outs) == _summary(ref)
    for a, b in zip(outs, ref):  # logprobs: same tokens; values may differ in the last bits (other batches)
        for ca, cb in zip(a.outputs, b.outputs):
            if cb.logprobs is not None:
                assert [list(x) for x in ca.logprobs] == [list(x) for x in cb.logprobs]
                assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, rel=1e-4, abs=1e-4)
    assert counts[1] > 0, "no step was launched ahead"
    assert_all_free(llm.llm_engine)
    # a second call reuses the prefix cache filled under async scheduling: still the same results
    again = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    assert _summary(again) == _summary(ref)
    assert_all_free(llm.llm_engine)


def test_block_hashes_never_cover_a_pending_token(model):
    """Blocks filled with generated tokens under async scheduling are registered under the hash of
    their real tokens (a placeholder must never be hashed)."""
    llm = _llm(model, True, block_size=4)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=30,
                                                                             ignore_eos=True))
    seq = engine.scheduler.requests["a"].seqs[0]
    while engine.has_unfinished_requests():
        engine.step()
        assert not seq.has_pending_token  # placeholders live only inside step()
        expect, parent = [], None
        for i in range(len(seq.block_hashes)):
            parent = hash_block(parent, seq.token_ids[i * 4:(i + 1) * 4])
            expect.append(parent)
        assert seq.block_hashes == expect
    assert len(seq.block_hashes) >= 8


def test_abort_with_a_step_in_flight(model):
    sync = LLMEngine.from_pretrained(model, device="cpu", skip_tokenizer_init=True, max_model_len=256,
                                     num_kv_blocks=64, async_scheduling=False)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = run_engine(sync, PROMPTS[:3], greedy)
    engine = LLMEngine.from_pretrained(model, device="cpu", skip_tokenizer_init=True, max_model_len=256,
                                       num_kv_blocks=64, async_scheduling=True)
    got = run_engine(engine, PROMPTS[:3], greedy, abort_after={"r1": 6})
    assert got["r0"] == ref["r0"] and got["r2"] == ref["r2"]
    assert "r1" not in got or got["r1"] == ref["r1"][:len(got["r1"])]
    assert engine._inflight is None
    assert_all_free(engine)


def test_failed_launch_ahead_fails_only_its_requests(model):
    llm = _llm(model, True)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    launch, calls = runner.launch, [0]

    def flaky(sched, prev=None):
        if prev is not None:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure")
        return launch(sched, prev)

    runner.launch = flaky
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert all(o.finished for o in outs)
    assert any(o.error and "injected failure" in o.error for o in outs)
    assert all(-1 not in o.outputs[0].token_ids for o in outs)
    assert_all_free(engine)
    runner.launch = launch  # the engine carries on
    again = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=5,
                                                                          ignore_eos=True), use_tqdm=False)
    assert len(again[0].outputs[0].token_ids) == 5 and again[0].error is None


def test_waiting_requests_join_a_step_launched_ahead(model):
    """A request added while steps run ahead is admitted into the next launched-ahead step (its prompt
    is known on the host): no synchronous step is needed for it, and tokens equal the sync engine's."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    results = {}
    for async_scheduling in (False, True):
        engine = LLMEngine.from_pretrained(model, device="cpu", skip_tokenizer_init=True, max_model_len=256,
                                           num_kv_blocks=64, async_scheduling=async_scheduling)
        launched, launch = [], engine.runner.launch
        engine.runner.launch = lambda sched, prev=None: launched.append(
            (prev is not None, {e.seq.request.request_id for e in sched.seqs if e.num_new_tokens > 1})
        ) or launch(sched, prev)
        engine.add_request("first", {"prompt_token_ids": PROMPTS[0]}, params)
        for _ in range(5):
            engine.step()
        engine.add_request("second", {"prompt_token_ids": PROMPTS[1]}, params)
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        assert_all_free(engine)
        results[async_scheduling] = out
        if async_scheduling:
            assert any(ahead and "second" in prefills for ahead, prefills in launched)
    assert results[True] == results[False]


def test_async_scheduling_defaults():
    from qwen3coder.config import ModelConfig
    from qwen3coder.engine.config import EngineConfig

    cfg = ModelConfig.preset("tiny")
    assert EngineConfig.create(cfg, device="cpu").async_scheduling is False
    assert EngineConfig.create(cfg, device="cpu", async_scheduling=True).async_scheduling is True


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_warmup_leaves_the_engine_as_it_was(model, async_scheduling):
    """`LLMEngine.warmup` (run by `qwen3coder serve` on a GPU before serving) drives prefill, chunked
    and mixed steps through the normal loop, then leaves no request, no used or cached block, and the
    statistics and outputs of later requests unchanged."""
    kw = dict(device="cpu", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64,
              max_num_batched_tokens=64, async_scheduling=async_scheduling)
    engine = LLMEngine.from_pretrained(model, **kw)
    fresh = LLMEngine.from_pretrained(model, **kw)
    launches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, prev=None: launches.append(
        sorted(e.num_new_tokens for e in sched.seqs)) or launch(sched, prev)
    seconds = engine.warmup()
    assert seconds >= 0
    assert any(len(n) > 1 and n[0] == 1 and n[-1] > 1 for n in launches), "no mixed prefill + decode step"
    assert any(max(n) == 64 for n in launches), "no full-budget (chunked) prefill step"
    assert_all_free(engine)
    bm = engine.scheduler.block_manager
    assert not bm.hash_to_block and bm.num_cache_queries == 0
    stats = engine.get_stats()
    assert stats.num_requests_finished == 0 and stats.prompt_tokens_total == 0
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert run_engine(engine, PROMPTS[:3], greedy) == run_engine(fresh, PROMPTS[:3], greedy)
    engine.add_request("busy", {"prompt_token_ids": [3, 4]}, greedy)
    with pytest.raises(RuntimeError, match="unfinished"):
        engine.warmup()


def test_warmup_second_round_is_an_eager_step_of_short_sequences(model):
    """Where prefill graphs stop below the step budget, the warm-up also runs two prompts of just over half
    the largest graph together: one step above every graph, of short sequences (the eager attention's
    short-key tiles, which the long first round does not compile) and an odd number of tokens."""
    kw = dict(device="cpu", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64,
              max_num_batched_tokens=128, max_prefill_graph_tokens=32)
    engine = LLMEngine.from_pretrained(model, **kw)
    launches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, prev=None: launches.append(
        sorted(e.num_new_tokens for e in sched.seqs)) or launch(sched, prev)
    engine.warmup()
    assert [17, 18] in launches
    assert_all_free(engine)


def test_warmup_hybrid_keeps_no_state_snapshot():
    engine = LLMEngine.from_pretrained(random_model("tiny-next"), device="cpu", skip_tokenizer_init=True,
                                       max_model_len=512, num_kv_blocks=64, max_num_batched_tokens=64,
                                       async_scheduling=True)
    engine.warmup()
    assert_all_free(engine)
    assert not engine.scheduler.state_manager.snapshots
