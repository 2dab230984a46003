"""Triton kernels against their PyTorch references (GPU: compiled; CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwen3coder.kernels.fused_moe import fused_moe, moe_align  # noqa: E402
from qwen3coder.kernels.paged_attention import paged_attention_decode  # noqa: E402
from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm  # noqa: E402
from qwen3coder.models.context import ForwardContext  # noqa: E402
from qwen3coder.models.layers.attention import paged_attention_reference  # noqa: E402
from qwen3coder.models.layers.moe import moe_forward_reference, route  # noqa: E402
from qwen3coder.models.layers.norms import RMSNorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# Triton's CPU interpreter computes through numpy, which has no bfloat16: bf16 is checked on the GPU
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def test_moe_align_layout():
    ids = torch.tensor([[3, 1], [1, 0], [3, 3]], device=DEV)
    sorted_ids, block_expert = moe_align(ids, num_experts=5, block_m=4)
    num_pairs = ids.numel()
    assert sorted_ids.numel() % 4 == 0 and block_expert.numel() == sorted_ids.numel() // 4
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [r for r in sorted_ids[b * 4:(b + 1) * 4].tolist() if r < num_pairs]
        if e < 0:
            assert not rows
            continue
        assert all(ids.flatten()[r].item() == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(num_pairs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens, experts, top_k, hidden, inter", [(1, 8, 2, 64, 32), (37, 16, 4, 64, 96)])
def test_fused_moe_matches_reference(dtype, n_tokens, experts, top_k, hidden, inter):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, hidden, generator=g).to(DEV, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(DEV, dtype)
    logits = torch.randn(n_tokens, experts, generator=g).to(DEV, dtype)
    weights, ids = route(logits, top_k, True, dtype)
    expected = moe_forward_reference(x, w13, w2, weights, ids).float()
    got = fused_moe(x, w13, w2, weights, ids).float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= TOL[dtype] * max(1.0, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 2, 32, 16), (8, 1, 64, 8), (4, 4, 16, 4)])
def test_paged_decode_matches_reference(dtype, split, heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(1)
    seq_lens = [1, 7, 33, block_size * 3] + ([130, 75] if split else [])
    tables, nxt = [], 1
    for n in seq_lens:
        blocks = (n + block_size - 1) // block_size
        tables.append([nxt + 2 * i for i in range(blocks)])  # non-contiguous blocks
        nxt += 2 * blocks
    num_blocks = nxt + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g).to(DEV, dtype)
    ctx = ForwardContext.build([1] * len(seq_lens), seq_lens, tables, block_size, device=DEV)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    # split form: partitions of 32 tokens, and a bound above every length (empty trailing splits)
    kwargs = dict(max_seq_len=max(seq_lens) + 40, partition=32) if split else {}
    got = paged_attention_decode(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale, **kwargs).float()
    assert (got - expected).abs().max().item() <= TOL[dtype] * 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centered", [False, True])
def test_fused_add_rmsnorm_matches_reference(dtype, zero_centered):
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(96, 1e-6, zero_centered=zero_centered)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g) * 0.3 + (0.0 if zero_centered else 1.0))
    norm = norm.to(DEV, dtype)
    x = torch.randn(5, 96, generator=g).to(DEV, dtype)
    r = torch.randn(5, 96, generator=g).to(DEV, dtype)
    exp_out, exp_res = norm(x, r)
    out, res = fused_add_rmsnorm(x, r, norm.weight, 1e-6, zero_centered)
    assert torch.equal(res, exp_res)
    assert (out.float() - exp_out.float()).abs().max().item() <= TOL[dtype] * 4
    assert (fused_add_rmsnorm(x, None, norm.weight, 1e-6, zero_centered).float()
            - norm(x).float()).abs().max().item() <= TOL[dtype] * 4


def test_kernels_only_without_autograd():
    from qwen3coder.kernels import use_triton

    t = torch.zeros(2, device="meta")
    assert not use_triton(t)  # not CUDA
    if torch.cuda.is_available():
        c = torch.zeros(2, device="cuda")
        with torch.no_grad():
            assert use_triton(c)
        assert not use_triton(c)  # autograd on: training must take the differentiable path
