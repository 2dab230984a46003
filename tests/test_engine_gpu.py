"""CUDA model runner (needs a GPU; skipped otherwise): greedy outputs on CUDA equal the CPU engine's
in float32, CUDA-graph decode equals eager decode on the same device (float32 and bfloat16), and
the KV pool is sized from free memory."""

from __future__ import annotations

import pytest
import torch

from qwen3coder.engine import LLM, SamplingParams
from tests.hf_models import hf_model, save_hf

pytestmark = pytest.mark.gpu

PROMPTS = [[(5 * i + k) % 250 + 1 for i in range(n)] for k, n in enumerate([1, 7, 16, 23, 40, 3, 64, 12, 33])]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_next"])
def checkpoint(request, tmp_path_factory):
    return save_hf(hf_model(request.param, seed=2), str(tmp_path_factory.mktemp(request.param)))


def generate(path, **kw):
    args = dict(skip_tokenizer_init=True, max_model_len=256, max_num_seqs=16)
    args.update(kw)
    llm = LLM(path, **args)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def test_cuda_float32_matches_cpu(checkpoint):
    cpu, _ = generate(checkpoint, device="cpu", dtype="float32", num_kv_blocks=128)
    eager, _ = generate(checkpoint, device="cuda", dtype="float32", enforce_eager=True)
    graphs, llm = generate(checkpoint, device="cuda", dtype="float32")
    assert eager == cpu
    assert graphs == cpu
    runner = llm.llm_engine.runner
    assert runner.num_kv_blocks >= 16 * 16  # sized from free memory, capped at what 16 x 256 tokens use


def _device_only_decode(monkeypatch):
    """Until the model's decode attention is capturable, test the runner's graph plumbing with a
    decode path that reads only device tensors (gather the blocks, mask by seq_lens)."""
    from qwen3coder.models.base import CausalLM
    from qwen3coder.models.layers import attention as attn_mod

    original = attn_mod.PagedAttention.forward

    def forward(self, q, k, v, ctx):
        if not ctx.is_decode:
            return original(self, q, k, v, ctx)
        flat_k = self.k_cache.view(-1, *self.k_cache.shape[2:])
        flat_v = self.v_cache.view(-1, *self.v_cache.shape[2:])
        flat_k.index_copy_(0, ctx.slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, ctx.slot_mapping, v.to(flat_v.dtype))
        tables = ctx.block_tables.long().clamp(min=0)  # [B, W]
        b, w = tables.shape
        bs = self.k_cache.shape[1]
        ks = self.k_cache[tables].reshape(b, w * bs, *self.k_cache.shape[2:]).to(q.dtype)  # [B, L, Hk, D]
        vs = self.v_cache[tables].reshape(b, w * bs, *self.v_cache.shape[2:]).to(q.dtype)
        rep = self.num_heads // self.num_kv_heads
        ks, vs = ks.repeat_interleave(rep, dim=2), vs.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bhd,blhd->bhl", q.float(), ks.float()) * self.scale
        valid = torch.arange(w * bs, device=q.device)[None, :] < ctx.seq_lens[:, None]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.einsum("bhl,blhd->bhd", scores.softmax(-1), vs.float()).to(q.dtype)

    def dense_moe(x, gate_up_proj, down_proj, topk_weights, topk_ids):  # no host sync: every expert
        weights = torch.zeros(x.shape[0], gate_up_proj.shape[0], dtype=torch.float32, device=x.device)
        weights.scatter_add_(1, topk_ids, topk_weights.float())
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(gate_up_proj.shape[0]):
            gate, up = torch.nn.functional.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
            h = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_proj[e])
            out += weights[:, e:e + 1] * h.float()
        return out.to(x.dtype)

    from qwen3coder.models.layers import moe as moe_mod

    monkeypatch.setattr(attn_mod.PagedAttention, "forward", forward)
    monkeypatch.setattr(moe_mod, "moe_forward_reference", dense_moe)
    monkeypatch.setattr(CausalLM, "supports_cuda_graphs", True, raising=False)


def test_cuda_graph_plumbing_matches_eager(checkpoint, monkeypatch):
    _device_only_decode(monkeypatch)
    eager, _ = generate(checkpoint, device="cuda", dtype="float32", enforce_eager=True)
    graphs, llm = generate(checkpoint, device="cuda", dtype="float32")
    assert llm.llm_engine.runner.graphs, "graphs should have been captured"
    assert graphs == eager


@pytest.mark.parametrize("moe_gemv", [False, True], ids=["grouped-moe", "moe-gemv"])
def test_cuda_graphs_match_eager_bfloat16(checkpoint, moe_gemv, monkeypatch):
    """moe-gemv: the decode-row MoE GEMVs (`kernels.moe_gemv`, whose down kernel reads the routing before
    its PDL wait) listed for the checkpoint's MoE shape at 1..4 rows."""
    if moe_gemv:
        import json
        import os

        import qwen3coder.kernels.moe_gemv as mg

        with open(os.path.join(checkpoint, "config.json")) as f:
            hf = json.load(f)
        shape = (hf["hidden_size"], hf["moe_intermediate_size"])
        monkeypatch.setattr(mg, "TUNED", {(r, *shape): mg.MoEGemvConfig() for r in range(1, mg.MAX_ROWS + 1)})
    eager, _ = generate(checkpoint, device="cuda", dtype="bfloat16", enforce_eager=True)
    graphs, llm = generate(checkpoint, device="cuda", dtype="bfloat16")
    assert graphs == eager
    if getattr(llm.llm_engine.model, "supports_cuda_graphs", False):
        assert llm.llm_engine.runner.graphs, "graphs should have been captured"


def test_seeded_sampling_on_cuda_is_batch_independent(checkpoint):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True)
    llm = LLM(checkpoint, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=16, device="cuda",
              dtype="float32")
    alone = llm.generate({"prompt_token_ids": PROMPTS[4]}, p, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [{"prompt_token_ids": q} for q in PROMPTS]
    params = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * len(PROMPTS)
    params[4] = p
    mixed = llm.generate(crowd, params, use_tqdm=False)[4].outputs[0].token_ids
    assert alone == mixed
    assert torch.cuda.is_available()


def test_async_scheduling_matches_sync_on_cuda(checkpoint):
    """On CUDA async scheduling is the default; its tokens equal the synchronous engine's, greedy and
    with penalties / seeds (which read the token still pending on the device), in graphs and eager."""
    mixed = [GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=20, repetition_penalty=1.3,
                                    presence_penalty=0.4, frequency_penalty=0.2, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=7, top_k=20, top_p=0.8, max_tokens=17, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=list(range(100, 140)))] * 3
    mixed = mixed[:len(PROMPTS)]
    for eager in (False, True):
        results = []
        for async_scheduling in (False, True):
            llm = LLM(checkpoint, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=16, device="cuda",
                      dtype="bfloat16", enforce_eager=eager, async_scheduling=async_scheduling)
            assert llm.llm_engine.config.async_scheduling is async_scheduling
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], mixed, use_tqdm=False)
            results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
        assert results[0] == results[1], f"enforce_eager={eager}"


def test_recapture_keeps_the_static_inputs_and_the_outputs(checkpoint):
    """`recapture_graphs` between two generations: the static input buffers hold the same values
    before and after (a replay right after runs the same step), and greedy outputs are unchanged.
    Prefix caching is off: with it the second generation prefills only the uncached tokens (and, in
    the hybrid model, continues the recurrent state from a snapshot), so bf16 GEMMs and scans tiled by
    the step's token count round differently (seen: one qwen3_next prompt's tokens diverged at the 5th)."""
    first, llm = generate(checkpoint, device="cuda", dtype="bfloat16", enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    before = {name: getattr(runner, name).clone() for name in runner._STATIC_INPUTS}
    assert before["g_seq_lens"].max().item() > 1  # the last decode step's lengths, not the fresh buffer's
    runner.recapture_graphs()
    for name, value in before.items():
        assert torch.equal(getattr(runner, name), value), name
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == first


def test_prefill_graphs_match_eager(checkpoint):
    """Prefill and mixed steps of up to `max_prefill_graph_tokens` tokens replay graphs captured for token
    buckets (the step padded, attention over a tile map): greedy outputs equal the eager engine's and
    those of an engine without prefill graphs, in float32, through chunked prefill (a 48-token budget:
    chunks alone and beside decode rows) and prefix-cache hits (a shared 40-token prefix). A request
    with prompt logprobs needs more logits rows than a graph has: its steps run eagerly, same values.
    Qwen3-Next (Gated DeltaNet prefill loops over sequences on the host) captures none."""
    shared = [(7 * i) % 250 + 1 for i in range(40)]
    prompts = [shared + p for p in PROMPTS] + PROMPTS[:3]
    params = [GREEDY] * len(prompts)
    params[2] = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)

    def run(**kw):
        llm = LLM(checkpoint, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=16, device="cuda",
                  dtype="float32", max_num_batched_tokens=48, **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        logprobs = [{t: lp.logprob for t, lp in entry.items()} for entry in outs[2].prompt_logprobs[1:]]
        return [o.outputs[0].token_ids for o in outs], logprobs, llm.llm_engine.runner

    eager, eager_lp, _ = run(enforce_eager=True)
    plain, _, plain_runner = run(max_prefill_graph_tokens=0)
    graphs, graphs_lp, runner = run()
    assert not plain_runner.prefill_graphs and plain_runner.num_prefill_graph_steps == 0
    if runner.hybrid:
        assert not runner.prefill_graphs
    else:
        assert sorted(runner.prefill_graphs) == [16, 32, 48]
        assert runner.num_prefill_graph_steps > 0
    assert graphs == eager
    assert plain == eager
    for got, want in zip(graphs_lp, eager_lp):
        assert got.keys() == want.keys()
        assert max(abs(got[t] - want[t]) for t in got) < 1e-4


def test_prefill_graph_after_a_larger_bucket(checkpoint):
    """A prefill graph computes logits for `min(bucket, max_num_seqs)` rows, of which a step may use a
    few: the others must still index the step's own bucket. Here a 48-token bucket's step (16 prompts
    of 3 tokens, logits rows up to 47) is followed by a lone 5-token prompt in the 16-token bucket
    (rows 1..15 left over from the larger step once indexed past its 16 hidden rows: a device-side
    assert). Outputs equal the eager engine's."""
    first = [[(11 * i + k) % 250 + 1 for i in range(3)] for k in range(16)]
    second = [[3, 14, 15, 92, 65]]

    def run(**kw):
        llm = LLM(checkpoint, skip_tokenizer_init=True, max_model_len=128, max_num_seqs=16, device="cuda",
                  dtype="float32", max_num_batched_tokens=48, **kw)
        outs = [llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
                for prompts in (first, second)]
        return [[o.outputs[0].token_ids for o in batch] for batch in outs], llm.llm_engine.runner

    eager, _ = run(enforce_eager=True)
    graphs, runner = run()
    assert runner.hybrid or runner.num_prefill_graph_steps >= 2
    assert graphs == eager
