"""Triton decode attention over the paged KV cache (one new query token per sequence).

One program per (sequence, KV head) handles that head's whole GQA group: it loads the group's
queries once, walks the sequence's blocks through `block_tables` up to `seq_lens` (device tensors
only: no host sync, so decode can be captured in a CUDA graph), and keeps an online softmax in fp32.
Long contexts are split (flash-decoding): each of `cdiv(max_seq_len, partition)` programs per head
covers one partition and writes its partial max, sum and output; a second kernel merges them. The
number of splits comes from a host-side upper bound of the lengths, so a captured graph keeps its
grid; partitions past a sequence's end exit at once.
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
    def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, m_ptr,
                             l_ptr, acc_ptr, scale, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                             stride_bt, stride_on, stride_oh, blocks_per_split, num_splits, num_heads,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr):
        """One (sequence, KV head, partition): online softmax over the partition's blocks. Without
        SPLIT the single partition is the whole sequence and the output is written directly; with
        SPLIT the partial max, sum and unnormalised output go to m/l/acc for the merge kernel."""
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
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
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(seq_len, BLOCK_SIZE))
        for b in range(first, last):
            block = tl.load(block_tables_ptr + seq * stride_bt + b).to(tl.int64)
            base = block * stride_kb + kvh * stride_kh
            k = tl.load(k_cache_ptr + base + s[:, None] * stride_ks + d[None, :]).to(tl.float32)
            v = tl.load(v_cache_ptr + base + s[:, None] * stride_ks + d[None, :]).to(tl.float32)
            qk = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BS]
            qk = tl.where(((b * BLOCK_SIZE + s) < seq_len)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        if SPLIT:
            # partials laid out [seq, head, split] (acc: [..., HEAD_DIM]); an empty split keeps m=-inf, l=0
            row = (seq * num_heads + heads) * num_splits + split
            tl.store(m_ptr + row, m_i, mask=g_mask)
            tl.store(l_ptr + row, l_i, mask=g_mask)
            tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])

    @triton.jit
    def _paged_decode_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, num_heads, stride_on, stride_oh,
                                   HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        ok = sp < num_splits
        row = (seq * num_heads + head) * num_splits + sp
        m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + seq * stride_on + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int | None = None, partition: int = 512,
                           max_splits: int = 16) -> torch.Tensor:
    """q [S, Hq, D] (one token per sequence) -> [S, Hq, D]; caches [blocks, block_size, Hk, D].

    `max_seq_len` (a host-side upper bound of `seq_lens`) above `partition` selects the split form."""
    assert triton is not None, "triton is not installed"
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0, \
        "head_dim and block_size must be powers of two"
    assert k_cache.stride(3) == 1 and q.stride(2) == 1
    out = torch.empty_like(q)
    num_blocks_max = triton.cdiv(max_seq_len, block_size) if max_seq_len is not None else 0
    split = max_seq_len is not None and max_seq_len > partition
    if split:
        # at most `max_splits` partitions: a captured graph's bound (max_model_len) must not make short
        # contexts pay for hundreds of empty splits
        partition = max(partition, triton.next_power_of_2(triton.cdiv(max_seq_len, max_splits)))
        blocks_per_split = max(1, partition // block_size)
        num_splits = triton.cdiv(num_blocks_max, blocks_per_split)
        m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        blocks_per_split, num_splits = block_tables.shape[1], 1  # one partition: the whole table
        m = l = acc = out  # unused
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, l, acc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), blocks_per_split, num_splits, num_heads,
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, SPLIT=split)
    if split:
        _paged_decode_merge_kernel[(num_seqs, num_heads)](
            m, l, acc, out, num_splits, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits))
    return out
