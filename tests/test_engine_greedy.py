"""Greedy engine outputs equal transformers' `generate(do_sample=False)` for both architectures, under
every scheduling regime: prefix caching on/off, chunked prefill at several budgets, block sizes,
preemption (tiny KV pool), aborts of other requests, repeated calls (prefix-cache hits, hybrid state
snapshots) and n>1 forks. After the work ends, every block and state slot is free again."""

from __future__ import annotations

import pytest
import torch

from qwen3coder.engine import LLM, SamplingParams
from tests.hf_models import hf_model, save_hf
from tests.test_engine_helpers import assert_all_free, run_engine

MAX_TOKENS = 10
_base = [(7 * i + 3) % 250 + 2 for i in range(70)]
PROMPTS = [
    _base[:40],  # long
    [9],  # one token
    _base[:5],
    _base[:33],  # shares 33 tokens (2 full 16-blocks) with the first
    _base[:64],  # exact multiple of the block size
    _base[:40],  # identical to the first
    [11, 12, 13] + _base[3:20],  # shares a suffix only
    _base[:17],
]


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    model_type = request.param
    hf = hf_model(model_type, seed=1)
    path = save_hf(hf, str(tmp_path_factory.mktemp(model_type)))
    refs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                              min_new_tokens=MAX_TOKENS, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return model_type, path, refs


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

CONFIGS = {
    "default": dict(),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "chunk7": dict(max_num_batched_tokens=7),
    "chunk16_bs4": dict(max_num_batched_tokens=16, block_size=4),
    "chunk33_no_cache": dict(max_num_batched_tokens=33, enable_prefix_caching=False),
    "tiny_pool": dict(num_kv_blocks=6, max_num_batched_tokens=48),
    "tiny_pool_bs4": dict(num_kv_blocks=22, block_size=4, max_num_seqs=3),
    # async scheduling (step n+1 planned before step n's tokens are read), forced on the CPU
    "async": dict(async_scheduling=True),
    "async_chunk7": dict(async_scheduling=True, max_num_batched_tokens=7),
    "async_tiny_pool_bs4": dict(async_scheduling=True, num_kv_blocks=22, block_size=4, max_num_seqs=3),
    "async_max_seqs2": dict(async_scheduling=True, max_num_seqs=2),
}


def make_llm(path: str, **kw) -> LLM:
    args = dict(skip_tokenizer_init=True, max_model_len=256, max_num_seqs=8, num_kv_blocks=64, dtype="float32",
                device="cpu")
    args.update(kw)
    return LLM(path, **args)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(checkpoint, name):
    _, path, refs = checkpoint
    llm = make_llm(path, **CONFIGS[name])
    engine = llm.llm_engine
    for round_ in range(2):  # the second round hits the prefix cache (when on)
        got = run_engine(engine, PROMPTS, GREEDY)
        for i, ref in enumerate(refs):
            assert got[f"r{i}"] == ref, f"{name} round {round_}: prompt {i} (len {len(PROMPTS[i])})"
        assert_all_free(engine)
    stats = engine.get_stats()
    if CONFIGS[name].get("enable_prefix_caching", True):
        assert stats.prefix_cache_hits > 0
    if name.startswith("tiny_pool"):
        assert stats.num_preemptions > 0


def test_llm_generate_order_and_hybrid_snapshots(checkpoint):
    model_type, path, refs = checkpoint
    llm = make_llm(path)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    again = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == refs[0]
    assert again.num_cached_tokens == 32  # two full blocks of 16 (the last token is always recomputed)
    sm = llm.llm_engine.scheduler.state_manager
    if model_type == "qwen3_next":
        assert sm is not None and len(sm.snapshots) > 0
    else:
        assert sm is None


def test_aborting_others_keeps_outputs(checkpoint):
    _, path, refs = checkpoint
    llm = make_llm(path, max_num_batched_tokens=24, num_kv_blocks=20)
    engine = llm.llm_engine
    victims = [[5] * 30, _base[10:50], [200, 201, 202]]
    prompts = PROMPTS + victims
    n = len(PROMPTS)
    aborts = {f"r{n}": 1, f"r{n + 1}": 3, f"r{n + 2}": 6}
    long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    got = run_engine(engine, prompts, [GREEDY] * n + [long] * len(victims), abort_after=aborts)
    for i, ref in enumerate(refs):
        assert got[f"r{i}"] == ref
    assert not any(f"r{n + k}" in got for k in range(len(victims)))
    assert_all_free(engine)


def test_n_samples_share_prefix_blocks(checkpoint):
    _, path, refs = checkpoint
    llm = make_llm(path)
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("fork", {"prompt_token_ids": PROMPTS[0]}, params)
    shared_seen = False
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        running = engine.scheduler.running
        if len(running) == 3:
            tables = [s.block_table for s in running]
            shared_seen |= tables[0][:2] == tables[1][:2] == tables[2][:2]
        engine.scheduler.check_invariants()
    assert shared_seen, "forked samples should share the prompt's full blocks"
    assert final.finished and len(final.outputs) == 3
    for c in final.outputs:
        assert c.token_ids == refs[0]  # greedy: every sample is the greedy continuation
    assert_all_free(engine)


def test_n_samples_fork_with_seed_under_pressure(checkpoint):
    _, path, _ = checkpoint
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPTS[4]}
    a = make_llm(path).generate(prompt, params, use_tqdm=False)[0]
    b = make_llm(path, num_kv_blocks=7, max_num_seqs=2).generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_hybrid_reuse_stops_at_last_snapshot(checkpoint):
    """A prompt extending an earlier prompt + its output finds 3 cached KV blocks; a hybrid model may
    reuse only the 2 covered by a state snapshot (taken at the earlier prompt's block boundary)."""
    model_type, path, refs = checkpoint
    llm = make_llm(path)
    first = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)[0]
    longer = PROMPTS[0] + first.outputs[0].token_ids[:8] + [3, 4, 5, 6, 7]
    out = llm.generate({"prompt_token_ids": longer}, GREEDY, use_tqdm=False)[0]
    fresh = make_llm(path, enable_prefix_caching=False).generate({"prompt_token_ids": longer}, GREEDY,
                                                                  use_tqdm=False)[0]
    assert out.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert out.num_cached_tokens == (32 if model_type == "qwen3_next" else 48)
    no_snap = make_llm(path, num_state_snapshots=0)
    no_snap.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)
    again = no_snap.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == refs[0]
    assert again.num_cached_tokens == (0 if model_type == "qwen3_next" else 32)
