"""Scheduler invariants under random workloads (hypothesis), with a fake model runner: token
budget respected, KV pool never over-committed, blocks shared only through the prefix cache or an
n>1 fork, every request finishes, and everything is free at the end. Plus chunking and preemption."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from qwen3coder.engine.config import CacheConfig, SchedulerConfig
from qwen3coder.engine.sampler import SampledToken
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.engine.scheduler import ModelRunnerOutput, Scheduler
from qwen3coder.engine.sequence import Request


def fake_step(sched: Scheduler, rng: random.Random, eos: set[int]):
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert sum(e.num_new_tokens for e in out.seqs) == out.num_batched_tokens
    for e in out.seqs:
        assert e.start == e.seq.num_computed_tokens and e.start + e.num_new_tokens <= len(e.seq)
        assert len(e.seq.block_table) * sched.block_size >= e.start + e.num_new_tokens
    result = ModelRunnerOutput({s.seq_id: SampledToken(rng.randrange(20)) for s, _ in out.sample_rows()})
    sched.update_from_output(out, result, eos)
    return out


def drain(sched: Scheduler, rng: random.Random, eos=frozenset({0}), abort_prob=0.0, max_steps=5000):
    steps = 0
    while sched.has_unfinished():
        fake_step(sched, rng, set(eos))
        if abort_prob and sched.requests and rng.random() < abort_prob:
            sched.abort_request(rng.choice(sorted(sched.requests)))
        for rid in [r for r, q in sched.requests.items() if q.is_finished]:
            sched.pop_finished_request(rid)
        sched.check_invariants()
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def make_sched(num_blocks, bs=4, budget=32, max_seqs=4, caching=True, hybrid=False):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=64),
                     CacheConfig(block_size=bs, enable_prefix_caching=caching), num_blocks,
                     num_state_slots=max_seqs + 2 if hybrid else 0, num_snapshots=2 if hybrid else 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 5), min_size=1, max_size=30), st.integers(1, 12),
                          st.integers(1, 3)), min_size=1, max_size=8),
       st.integers(10, 24), st.integers(1, 40), st.integers(1, 5), st.booleans(), st.booleans(),
       st.floats(0, 0.2), st.integers(0, 99))
def test_random_workloads_finish_and_free_everything(reqs, num_blocks, budget, max_seqs, caching, hybrid,
                                                     abort_prob, seed):
    rng = random.Random(seed)
    sched = make_sched(num_blocks, budget=budget, max_seqs=max_seqs, caching=caching, hybrid=hybrid)
    all_reqs = []
    for i, (prompt, max_tokens, n) in enumerate(reqs):
        if (len(prompt) + max_tokens + 3) // 4 > num_blocks:
            continue  # the engine rejects these at add_request
        r = Request(f"r{i}", None, prompt, SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0))
        r.params.all_stop_token_ids = {0}
        sched.add_request(r)
        all_reqs.append(r)
    drain(sched, rng, abort_prob=abort_prob)
    for r in all_reqs:
        assert r.is_finished
        assert len(r.seqs) == r.params.n or r.seqs[0].finish_reason == "abort"
        for s in r.seqs:
            assert s.finish_reason in ("stop", "length", "abort")
            assert s.num_output_tokens <= r.params.max_tokens
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    if hybrid:
        assert sched.state_manager.num_seq_slots == 0


def test_chunked_prefill_respects_budget_and_decodes_first():
    sched = make_sched(64, budget=10, max_seqs=4)
    a = Request("a", None, [1] * 25, SamplingParams(max_tokens=5))
    sched.add_request(a)
    chunks = []
    rng = random.Random(0)
    while a.seqs[0].num_computed_tokens < 25:
        out = fake_step(sched, rng, set())
        chunks.append(out.seqs[0].num_new_tokens)
    assert chunks == [10, 10, 5]
    b = Request("b", None, [2] * 30, SamplingParams(max_tokens=5))
    sched.add_request(b)
    out = fake_step(sched, rng, set())
    assert [(e.seq.request.request_id, e.num_new_tokens) for e in out.seqs] == [("a", 1), ("b", 9)]


def test_preemption_by_recompute():
    sched = make_sched(6, bs=4, budget=64, max_seqs=4)
    rng = random.Random(1)
    reqs = [Request(f"r{i}", None, [i + 1] * 6, SamplingParams(max_tokens=12, ignore_eos=True)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    drain(sched, rng, eos=set())
    assert sched.num_preemptions > 0
    assert all(r.seqs[0].num_output_tokens == 12 for r in reqs)


def test_hybrid_snapshot_boundary_chunking():
    sched = make_sched(32, bs=4, budget=64, max_seqs=2, hybrid=True)
    r = Request("a", None, list(range(1, 15)), SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(r)
    rng = random.Random(0)
    first = fake_step(sched, rng, set())
    assert first.seqs[0].num_new_tokens == 12  # ends at the last full block before the final token
    assert len(sched.state_manager.snapshots) == 1
    drain(sched, rng, eos=set())
    again = Request("b", None, list(range(1, 15)), SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(again)
    out = fake_step(sched, rng, set())
    assert out.seqs[0].start == 12 and out.state_copies  # resumes from the snapshot
