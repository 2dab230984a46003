"""Triton decode attention over the paged KV cache (one new query token per sequence).

One program per (sequence, KV head) handles that head's whole GQA group: it loads the group's
queries once, walks the sequence's blocks through `block_tables` up to `seq_lens` (device tensors
only: no host sync, so decode can be captured in a CUDA graph), and keeps an online softmax in fp32.
`paged_attention_reference` in `qwen3coder.models.layers.attention` is the plain-PyTorch reference
that tests compare against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                             scale, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_bt, stride_on, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        s = tl.arange(0, BLOCK_SIZE)
        heads = kvh * GROUP + g
        g_mask = g < GROUP
        q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None], other=0.0).to(tl.float32) * scale
        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
        for b in range(0, num_blocks):
            block = tl.load(block_tables_ptr + seq * stride_bt + b).to(tl.int64)
            base = block * stride_kb + kvh * stride_kh
            k = tl.load(k_cache_ptr + base + s[:, None] * stride_ks + d[None, :]).to(tl.float32)
            v = tl.load(v_cache_ptr + base + s[:, None] * stride_ks + d[None, :]).to(tl.float32)
            qk = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BS]
            valid = (b * BLOCK_SIZE + s) < seq_len
            qk = tl.where(valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D]; caches [blocks, block_size, Hk, D]."""
    assert triton is not None, "triton is not installed"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0, \
        "head_dim and block_size must be powers of two"
    assert k_cache.stride(3) == 1 and q.stride(2) == 1
    out = torch.empty_like(q)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size)
    return out
