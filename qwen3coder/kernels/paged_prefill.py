"""Triton attention over the paged KV cache for any mix of query lengths: prefill, chunked prefill
and decode rows in one launch (flash attention, variable length, GQA, causal).

The prefill path of the reference (`paged_attention_reference`) loops over sequences in Python,
gathering each one's blocks and calling SDPA; in a mixed step of 8 prefill chunks and 56 decodes
that is 64 small attention calls per layer. This kernel replaces the loop:

* Grid `(cdiv(max_query_len, BLOCK_M), sequences, query heads)`. Program (m, s, h) owns query rows
  `m*BLOCK_M ...` of sequence s (tokens `query_start_loc[s] + row`), which sit at positions
  `context_len + row` with `context_len = seq_lens[s] - query_len` (what was cached before this
  step: a prefix-cache hit, earlier chunks, or the decode history). Programs past a sequence's
  query length exit at once; `max_query_len` is a host int. A CUDA graph captured for a token
  budget cannot bake that in: it passes a tile map instead (`build_tile_map`, a device list of
  `(sequence, query tile)` work items padded with -1 to a size fixed by the budget), and the grid is
  `(map size, query heads)`.
* Keys/values are walked in BLOCK_N-token tiles from 0 to the last position the tile's rows can
  see (causal, aligned to the bottom-right corner as in `causal_lower_right`): first the tiles that
  every row sees whole (no masks), then the diagonal ones with the causal and length masks; each
  tile's rows gathered through the block table (`block = token // block_size`). Entries past `seq_len` are never
  read (tables are -1 padded). QK^T and PV are `tl.dot`s with fp32 accumulation, softmax online in
  base 2 with `scale * log2(e)` folded in. Every row sees position 0, so no row is fully masked.
* GQA: query head h reads KV head `h // group`.

The new keys/values of this step must already be in the cache (the fused prologue or `store_kv`
writes them first). fp32 inputs use IEEE dots, for parity with the CPU reference.
"""

from __future__ import annotations

import torch

from qwen3coder.kernels.paged_attention import _LOG2E  # the softmax runs in base 2

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

if triton is not None:

    @triton.jit
    def _attend_tile(q, m_i, l_i, acc, start, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kvh, pos, end,
                     qk_scale, stride_kb, stride_ks, stride_kh, stride_bt, d, cols, BLOCK_SIZE: tl.constexpr,
                     MASK: tl.constexpr, IEEE: tl.constexpr):
        """One BLOCK_N-token key/value tile folded into the online softmax of the query rows. Without
        MASK every key of the tile is visible to every row (tiles wholly before the diagonal)."""
        toks = start + cols
        if MASK:
            tok_ok = toks < end
            block = tl.load(block_tables_ptr + seq * stride_bt + toks // BLOCK_SIZE, mask=tok_ok, other=0)
        else:
            block = tl.load(block_tables_ptr + seq * stride_bt + toks // BLOCK_SIZE)
        base = block.to(tl.int64) * stride_kb + (toks % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        if MASK:
            k = tl.load(k_cache_ptr + base[None, :] + d[:, None], mask=tok_ok[None, :], other=0.0)  # [D, N]
        else:
            k = tl.load(k_cache_ptr + base[None, :] + d[:, None])
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, k) * qk_scale
        if MASK:
            visible = (toks[None, :] <= pos[:, None]) & tok_ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASK:
            v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=tok_ok[:, None], other=0.0)  # [N, D]
        else:
            v = tl.load(v_cache_ptr + base[:, None] + d[None, :])
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
                              tile_map_ptr, out_ptr, qk_scale, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                              stride_bt, stride_on, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              IEEE: tl.constexpr, TILE_MAP: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        if TILE_MAP:  # grid (tiles, heads): entry = seq << 16 | query tile, -1 = no work
            entry = tl.load(tile_map_ptr + tl.program_id(0))
            if entry < 0:
                return
            seq = entry >> 16
            mt = entry & 0xFFFF
            head = tl.program_id(1)
        else:
            mt = tl.program_id(0)
            seq = tl.program_id(1)
            head = tl.program_id(2)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        if mt * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        tok_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tok_rows[:, None] * stride_qn + head * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        kvh = head // GROUP
        pos = ctx_len + rows  # absolute position of each query row
        first_pos = ctx_len + mt * BLOCK_M  # the tile's first row sees keys 0..first_pos
        end = tl.minimum(seq_len, first_pos + BLOCK_M)  # one past the last key any row of the tile sees
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys before it: visible to every row
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for start in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                         seq, kvh, pos, end, qk_scale, stride_kb, stride_ks, stride_kh,
                                         stride_bt, d, cols, BLOCK_SIZE, False, IEEE)
        for start in range(full_end, end, BLOCK_N):  # the diagonal: causal and length masks
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                         seq, kvh, pos, end, qk_scale, stride_kb, stride_ks, stride_kh,
                                         stride_bt, d, cols, BLOCK_SIZE, True, IEEE)
        out = acc / l_i[:, None]
        tl.store(out_ptr + tok_rows[:, None] * stride_on + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_block_m(max_query_len: int) -> int:
    """Query rows per program (BLOCK_M) for a step whose longest query has `max_query_len` tokens."""
    return 16 if max_query_len <= 16 else 64 if max_query_len <= 256 else 128


def tile_map_size(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Most query tiles `num_seqs` sequences of `num_tokens` tokens in all can need: a sequence adds
    at most one partial tile."""
    return -(-num_tokens // block_m) + num_seqs


def build_tile_map(query_lens: list[int], block_m: int, size: int) -> list[int]:
    """The work list of `paged_attention_varlen(..., tile_map=)`: one entry `seq << 16 | tile` per
    BLOCK_M-row query tile of every sequence, then -1 up to `size` entries."""
    tiles = [s << 16 | m for s, n in enumerate(query_lens) for m in range(-(-n // block_m))]
    assert len(query_lens) < 1 << 15 and all(n <= block_m << 16 for n in query_lens), "tile map overflow"
    assert len(tiles) <= size, f"{len(tiles)} tiles do not fit a map of {size}"
    return tiles + [-1] * (size - len(tiles))


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_query_len: int, tile_map: torch.Tensor | None = None,
                           block_m: int | None = None) -> torch.Tensor:
    """q [N, Hq, D] (the new tokens of every sequence, flattened) -> [N, Hq, D]; caches
    [blocks, block_size, Hk, D] already holding this step's keys and values; `max_query_len` is the
    longest query (host int).

    `tile_map` (int32 [tiles], `build_tile_map` with `block_m`): launch one program per entry and head
    instead of `cdiv(max_query_len, BLOCK_M) x sequences x heads`, so the grid depends only on the
    map's size, not on the step's lengths: what a CUDA graph captured for a token budget needs (prefill
    graphs, `engine.cuda_runner`). Rows of `q` past the last sequence's tokens (a graph's padding)
    then come out as zeros; `max_query_len` is not read."""
    assert triton is not None, "triton is not installed"
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert head_dim & (head_dim - 1) == 0 and head_dim >= 16, "head_dim must be a power of two >= 16"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    out = torch.empty_like(q) if tile_map is None else torch.zeros_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if tile_map is None:
        block_m = prefill_block_m(max_query_len)
        grid: tuple[int, ...] = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    else:
        assert block_m is not None and tile_map.dtype == torch.int32, "a tile map needs its block_m (int32 map)"
        grid = (tile_map.numel(), num_heads)
    block_n = 64 if head_dim <= 128 else 32
    ieee = q.dtype == torch.float32
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tile_map if tile_map is not None else seq_lens,
        out, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, TILE_MAP=tile_map is not None,
        num_warps=4 if block_m == 16 else 8,
        num_stages=3 if block_m < 128 else 2,
        **pdl_launch(q.device))
    return out
