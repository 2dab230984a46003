"""QK-norm, RoPE and the KV store folded into decode attention (`paged_attention_decode(prologue=...)`).

The fold runs `kernels.qk_norm_rope`'s own tile code inside the attention kernel, so it must give the
same bits as the two launches it replaces — `fused_qk_norm_rope_store` then `paged_attention_decode` —
for the output and for both caches: Qwen3 (full rotary) and Qwen3-Next (gated query layout, partial
rotary, zero-centred norms) shapes, one split / uneven splits / mostly empty splits, new tokens first,
inside and last in their 64-token tile. CPU: Triton's interpreter (fp32, fp16); GPU (`-m gpu`): bf16
at the 30B-A3B attention shape with the graph-sized split count.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwen3coder.config import RopeConfig  # noqa: E402
from qwen3coder.kernels.paged_attention import DecodePrologue, paged_attention_decode  # noqa: E402
from qwen3coder.kernels.qk_norm_rope import fused_qk_norm_rope_store  # noqa: E402
from qwen3coder.models.context import ForwardContext  # noqa: E402
from qwen3coder.models.layers.rotary import RotaryEmbedding  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _case(seq_lens, hq, hk, d, rope: RopeConfig, zero_centered: bool, gated: bool, block_size: int,
          dtype: torch.dtype, seed: int = 0):
    """Caches with each sequence on scattered blocks, the raw qkv projection of each sequence's new token
    (at position seq_len - 1, its slot in its last block), norm weights and the step's cos/sin."""
    g = torch.Generator().manual_seed(seed)
    tables, nxt = [], 1
    for n in seq_lens:
        blocks = -(-n // block_size)
        tables.append([nxt + 2 * i for i in range(blocks)])
        nxt += 2 * blocks
    width = max(len(t) for t in tables)
    tables = [t + [-1] * (width - len(t)) for t in tables]
    shape = (nxt + 1, block_size, hk, d)
    k_cache = torch.randn(shape, generator=g).to(DEV, dtype)
    v_cache = torch.randn(shape, generator=g).to(DEV, dtype)
    ctx = ForwardContext.build([1] * len(seq_lens), seq_lens, tables, block_size, device=DEV)
    n = len(seq_lens)
    q_size, kv = hq * d * (2 if gated else 1), hk * d
    qkv = (torch.randn(n, q_size + 2 * kv, generator=g) * 2.0).to(DEV, dtype)
    q, k, v = qkv.split([q_size, kv, kv], dim=-1)
    q = q.view(n, hq, 2 * d)[..., :d] if gated else q.view(n, hq, d)
    offset = 0.0 if zero_centered else 1.0
    q_w = (torch.randn(d, generator=g) * 0.3 + offset).to(DEV, dtype)
    k_w = (torch.randn(d, generator=g) * 0.3 + offset).to(DEV, dtype)
    positions = torch.tensor([L - 1 for L in seq_lens], device=DEV)
    cos, sin = RotaryEmbedding(rope, d).cos_sin(positions, dtype)
    slots = torch.tensor([t[(L - 1) // block_size] * block_size + (L - 1) % block_size
                          for t, L in zip(tables, seq_lens)], device=DEV)
    prologue = DecodePrologue(k.view(n, hk, d), v.view(n, hk, d), q_w, k_w, 1e-6, cos, sin, slots, zero_centered)
    return q, prologue, k_cache, v_cache, ctx


def _assert_fold_equals_two_launches(q, p: DecodePrologue, k_cache, v_cache, ctx, **kwargs):
    k_a, v_a, k_b, v_b = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    d = q.shape[-1]
    q_a = fused_qk_norm_rope_store(q, p.k, p.v, p.q_weight, p.k_weight, p.eps, p.cos, p.sin, k_a, v_a,
                                   p.slot_mapping, zero_centered=p.zero_centered)
    two = paged_attention_decode(q_a, k_a, v_a, ctx.block_tables, ctx.seq_lens, d ** -0.5, **kwargs)
    fold = paged_attention_decode(q, k_b, v_b, ctx.block_tables, ctx.seq_lens, d ** -0.5, prologue=p, **kwargs)
    assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
    assert not torch.equal(k_a, k_cache)  # the step's keys were stored
    assert torch.equal(two, fold)


# lengths: the new token alone in a tile (1, 65), inside one (17, 200) and last in one (64)
LENS = [1, 17, 64, 65, 200]
CONFIGS = {  # q heads, kv heads, head_dim, rope, zero-centred, gated
    "qwen3": (8, 2, 64, RopeConfig(theta=1e7), False, False),
    "next": (4, 1, 32, RopeConfig(theta=5e6, partial_rotary_factor=0.25), True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if not CUDA else [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fold_equals_two_launches(dtype, num_splits, config):
    hq, hk, d, rope, zc, gated = CONFIGS[config]
    q, p, k_cache, v_cache, ctx = _case(LENS, hq, hk, d, rope, zc, gated, 16, dtype, seed=num_splits)
    _assert_fold_equals_two_launches(q, p, k_cache, v_cache, ctx, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run through the GPU machine)")
@pytest.mark.parametrize("seq_lens", [[129], [1, 100, 129, 2000, 64, 65, 300, 4096]])
def test_gpu_30b_shape_graph_splits(seq_lens):
    """32 query heads, 4 KV heads, head_dim 128, bf16, block size 16; the split count of a decode graph
    captured with a 32K bound (most splits empty)."""
    q, p, k_cache, v_cache, ctx = _case(seq_lens, 32, 4, 128, RopeConfig(theta=1e7), False, False, 16,
                                        torch.bfloat16, seed=len(seq_lens))
    _assert_fold_equals_two_launches(q, p, k_cache, v_cache, ctx, max_seq_len=32768)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA device of compute capability >= 9.0 (PDL)")
def test_gpu_step_token_read_after_the_wait():
    """With PDL the decode attention may start while `fused_qk_norm_rope_store` still stores the step's key
    and value: it must read them after its wait. Each round puts stale values in the step's slots (a
    non-PDL write), stores the step's key/value and attends, 32 rounds in one CUDA graph: every output
    equals the launches without PDL."""
    from qwen3coder.kernels import pdl

    seq_lens = [129, 1, 100, 2000, 64, 65, 300, 4096]
    q, p, k_cache, v_cache, ctx = _case(seq_lens, 32, 4, 128, RopeConfig(theta=1e7), False, False, 16,
                                        torch.bfloat16, seed=3)
    blocks, offsets = p.slot_mapping // 16, p.slot_mapping % 16
    stale = torch.full((len(seq_lens), 4, 128), 7.0, dtype=torch.bfloat16, device="cuda")

    def step() -> torch.Tensor:
        k_cache.index_put_((blocks, offsets), stale)  # what an earlier user of the slot left
        v_cache.index_put_((blocks, offsets), -stale)
        q_a = fused_qk_norm_rope_store(q, p.k, p.v, p.q_weight, p.k_weight, p.eps, p.cos, p.sin, k_cache, v_cache,
                                       p.slot_mapping)
        return paged_attention_decode(q_a, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 128 ** -0.5,
                                      max_seq_len=32768)

    before = pdl.pdl_enabled()
    try:
        pdl.set_pdl_enabled(False)
        expected = step().clone()
        pdl.set_pdl_enabled(True)
        assert pdl.use_pdl(q.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [step() for _ in range(32)]
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for out in outs:
                assert torch.equal(out, expected)
    finally:
        pdl.set_pdl_enabled(before)
