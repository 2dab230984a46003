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
  `(map size, query heads)`. Without a map, query tiles run last first (the longest causal ones start
  first, so the grid's tail is short work).
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

from qwen3coder.kernels.paged_attention import _LOG2E, _num_sms  # the softmax runs in base 2

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

# KV splits for steps of few query tiles (a short chunk after a long cached context: an agent's turn).
# H200, 30B-A3B attention shape, one layer in a CUDA graph, µs (`benchmarks/bench_prefill_attention.py --sweep`,
# benchmarks/results/prefill_attention_30b-a3b-20261130T132613.json, 4 warps / 2 stages): 16 new tokens after
# 8K cached: 168.5 unsplit -> 41.2 with 8 splits (39.4 with 16); 128 after 8K: 142.4 -> 74.0 with 4 (98.1 with
# 8); eight fresh 1,024-token prompts: 304.8 unsplit -> 453.5 with 2 (8 warps). So splits start only below
# ~2 programs per SM, and a split walks at least 512 keys.
PREFILL_PROGRAMS_PER_SM = 2
MAX_PREFILL_SPLITS = 16
MIN_KEY_TILES_PER_SPLIT = 8  # BLOCK_N-token key tiles (64 at head_dim 128)

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
        m_use = m_new
        if MASK:  # a KV split may hold no key a row sees yet: keep its m at -inf, its p and alpha 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
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
    def _tile_of_program(tile_map_ptr, query_start_ptr, seq_lens_ptr, num_splits, min_tiles, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, TILE_MAP: tl.constexpr):
        """(seq, query tile, q_start, q_len, ctx_len, end, per_split, used) of this program; q_len is 0
        when it has no work. Without a tile map the query tiles run last first: a causal tile's work grows
        with its index, so the longest ones start first and the grid ends on short ones. Keys [0, end) are
        dealt out in runs of `per_split` BLOCK_N-token tiles, so `used` of the `num_splits` splits hold keys:
        the split and merge kernels derive them alike."""
        if TILE_MAP:  # grid (tiles, heads x splits): entry = seq << 16 | query tile, -1 = no work
            entry = tl.load(tile_map_ptr + tl.program_id(0))
            seq = tl.maximum(entry, 0) >> 16
            mt = tl.maximum(entry, 0) & 0xFFFF
        else:  # grid (query tiles, sequences, heads x splits)
            entry = 0
            mt = tl.num_programs(0) - 1 - tl.program_id(0)
            seq = tl.program_id(1)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len
        q_len = tl.where((entry < 0) | (mt * BLOCK_M >= q_len), 0, q_len)
        end = tl.minimum(seq_len, ctx_len + mt * BLOCK_M + BLOCK_M)  # one past the last key the tile sees
        key_tiles = tl.cdiv(end, BLOCK_N)
        per_split = tl.maximum(tl.cdiv(key_tiles, num_splits), min_tiles)
        used = tl.cdiv(key_tiles, per_split)
        return seq, mt, q_start, q_len, ctx_len, end, per_split, used

    @triton.jit
    def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
                              tile_map_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, num_splits, min_tiles,
                              stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_on, stride_oh,
                              stride_ps, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              IEEE: tl.constexpr, TILE_MAP: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        if TILE_MAP:
            head_split = tl.program_id(1)
            num_heads = tl.num_programs(1) // num_splits
        else:
            head_split = tl.program_id(2)
            num_heads = tl.num_programs(2) // num_splits
        head = head_split // num_splits
        split = head_split % num_splits
        seq, mt, q_start, q_len, ctx_len, end, per_split, used = _tile_of_program(
            tile_map_ptr, query_start_ptr, seq_lens_ptr, num_splits, min_tiles, BLOCK_M, BLOCK_N, TILE_MAP)
        if q_len == 0 or split >= used:
            return
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        tok_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tok_rows[:, None] * stride_qn + head * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        kvh = head // GROUP
        pos = ctx_len + rows  # absolute position of each query row
        first_pos = ctx_len + mt * BLOCK_M  # the tile's first row sees keys 0..first_pos
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys before it: visible to every row
        lo = split * per_split * BLOCK_N  # this split's keys: [lo, hi)
        hi = tl.minimum(lo + per_split * BLOCK_N, end)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        cols = tl.arange(0, BLOCK_N)
        for start in range(lo, tl.minimum(hi, full_end), BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                         seq, kvh, pos, end, qk_scale, stride_kb, stride_ks, stride_kh,
                                         stride_bt, d, cols, BLOCK_SIZE, False, IEEE)
        for start in range(tl.maximum(lo, full_end), hi, BLOCK_N):  # the diagonal: causal and length masks
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                         seq, kvh, pos, end, qk_scale, stride_kb, stride_ks, stride_kh,
                                         stride_bt, d, cols, BLOCK_SIZE, True, IEEE)
        if used == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + tok_rows[:, None] * stride_on + head * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # partials [splits, tokens, heads] (acc: x head_dim), merged by _prefill_merge_kernel
            at = split * stride_ps + tok_rows * num_heads + head
            tl.store(m_ptr + at, m_i, mask=row_ok)
            tl.store(l_ptr + at, l_i, mask=row_ok)
            tl.store(acc_ptr + at[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _prefill_merge_kernel(query_start_ptr, seq_lens_ptr, tile_map_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                              num_splits, min_tiles, stride_on, stride_oh, stride_ps, HEAD_DIM: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_MAP: tl.constexpr,
                              PDL: tl.constexpr):
        """One program per query tile and head (the split kernel's grid without its splits): combines the
        `used` partials of tiles that had more than one; the others were written by the split kernel."""
        pdl_prologue(PDL)
        if TILE_MAP:
            head = tl.program_id(1)
            num_heads = tl.num_programs(1)
        else:
            head = tl.program_id(2)
            num_heads = tl.num_programs(2)
        seq, mt, q_start, q_len, ctx_len, end, per_split, used = _tile_of_program(
            tile_map_ptr, query_start_ptr, seq_lens_ptr, num_splits, min_tiles, BLOCK_M, BLOCK_N, TILE_MAP)
        if q_len == 0 or used == 1:
            return
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        tok_rows = (q_start + rows).to(tl.int64)
        m_run = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_run = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for j in range(0, used):
            at = j * stride_ps + tok_rows * num_heads + head
            m_j = tl.load(m_ptr + at, mask=row_ok, other=float("-inf"))
            l_j = tl.load(l_ptr + at, mask=row_ok, other=0.0)
            acc_j = tl.load(acc_ptr + at[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
            m_new = tl.maximum(m_run, m_j)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.math.exp2(m_run - m_use)
            b = tl.math.exp2(m_j - m_use)
            l_run = l_run * a + l_j * b
            acc = acc * a[:, None] + acc_j * b[:, None]
            m_run = m_new
        out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]  # 0 only on rows past the query (not stored)
        tl.store(out_ptr + tok_rows[:, None] * stride_on + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_launch(block_m: int, block_n: int = 64) -> tuple[int, int]:
    """(num_warps, num_stages) of the split kernel for BLOCK_M query rows and BLOCK_N-key tiles."""
    if block_n >= 128:
        return 8, 3  # the long-key sweep (`LONG_KEYS`)
    return (4 if block_m <= 64 else 8), 2  # the sweep of the JSON above


# Steps (without a tile map) whose longest sequence has at least LONG_KEYS keys walk 128-key tiles, 8 warps,
# 3 stages, with 128-row query tiles and 16-bit caches (fp32's 3 stages would not fit in shared memory).
# H200, 30B-A3B attention shape, one layer in a CUDA graph, µs (a prototype sweep of the eleventh session,
# benchmarks/results/prefill_attention_sweep_30b-a3b-20261130T171000.json): a fresh 8,192-token prompt 1,680 -> 1,533;
# its last 8,192-token chunk after 24,576 cached 11,057 -> 9,682; but 8 fresh 1,024-token prompts 304 -> 310
# and a mixed step of 7 x 1,024 + 56 decodes 456 -> 485, so shorter steps (and the graphs' tile maps) keep 64.
LONG_KEYS = 4096


def prefill_block_n(head_dim: int, block_m: int, max_seq_len: int | None, dtype: torch.dtype,
                    tile_map: bool) -> int:
    """Keys per tile of the split kernel (`LONG_KEYS`); 32 for head_dim above 128 (shared memory)."""
    if head_dim > 128:
        return 32
    long_keys = max_seq_len is not None and max_seq_len >= LONG_KEYS
    return 128 if long_keys and not tile_map and block_m == 128 and dtype.itemsize == 2 else 64


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


def choose_prefill_splits(num_tokens: int, num_heads: int, block_m: int, block_n: int, max_seq_len: int,
                          device: torch.device) -> int:
    """KV splits per query tile: as many as keep the step's query tiles x heads x splits within
    `PREFILL_PROGRAMS_PER_SM` programs per SM (1 when the tiles alone reach that), at most
    `MAX_PREFILL_SPLITS` and one per `MIN_KEY_TILES_PER_SPLIT` key tiles of the host-side length bound
    `max_seq_len`. Host integers only: a graph captured with a `max_model_len` bound keeps its grid (the
    kernels then split each tile by its real length: a short context stays in one split)."""
    programs = -(-num_tokens // block_m) * num_heads
    fill = PREFILL_PROGRAMS_PER_SM * _num_sms(device) // programs
    by_keys = -(-max(1, max_seq_len) // (block_n * MIN_KEY_TILES_PER_SPLIT))
    return max(1, min(MAX_PREFILL_SPLITS, fill, by_keys))


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_query_len: int, tile_map: torch.Tensor | None = None,
                           block_m: int | None = None, max_seq_len: int | None = None,
                           num_splits: int | None = None, min_tiles: int = MIN_KEY_TILES_PER_SPLIT,
                           num_warps: int | None = None, num_stages: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """q [N, Hq, D] (the new tokens of every sequence, flattened) -> [N, Hq, D]; caches
    [blocks, block_size, Hk, D] already holding this step's keys and values; `max_query_len` is the
    longest query (host int).

    `tile_map` (int32 [tiles], `build_tile_map` with `block_m`): launch one program per entry and head
    instead of `cdiv(max_query_len, BLOCK_M) x sequences x heads`, so the grid depends only on the
    map's size, not on the step's lengths: what a CUDA graph captured for a token budget needs (prefill
    graphs, `engine.cuda_runner`). Rows of `q` past the last sequence's tokens (a graph's padding)
    then come out as zeros; `max_query_len` is not read.

    `max_seq_len` (a host-side bound on `seq_lens`; None: no KV splits) lets a step of few query tiles
    split each tile's keys (`choose_prefill_splits`; `num_splits` forces a count) into runs of at
    least `min_tiles` key tiles, merged by a second kernel. `num_warps` / `num_stages`: the split kernel's
    launch (None: by BLOCK_M and BLOCK_N, `prefill_launch`); `block_n`: keys per tile (None: 64, or 128 for
    long eager steps, `prefill_block_n`)."""
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
    else:
        assert block_m is not None and tile_map.dtype == torch.int32, "a tile map needs its block_m (int32 map)"
    block_n = block_n or prefill_block_n(head_dim, block_m, max_seq_len, q.dtype, tile_map is not None)
    if num_splits is None:
        num_splits = 1 if max_seq_len is None else \
            choose_prefill_splits(num_tokens, num_heads, block_m, block_n, max_seq_len, q.device)
    assert num_splits >= 1 and min_tiles >= 1
    if tile_map is None:
        tiles: tuple[int, ...] = (triton.cdiv(max_query_len, block_m), num_seqs)
    else:
        tiles = (tile_map.numel(),)
    m = l_sum = acc = out  # unused with one split
    if num_splits > 1:
        m = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
        acc = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    default_warps, default_stages = prefill_launch(block_m, block_n)
    tile_arg = tile_map if tile_map is not None else seq_lens
    ieee = q.dtype == torch.float32
    _paged_prefill_kernel[(*tiles, num_heads * num_splits)](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tile_arg, out, m, l_sum, acc, scale * _LOG2E,
        num_splits, min_tiles, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), num_tokens * num_heads,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=ieee, TILE_MAP=tile_map is not None, num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages, **pdl_launch(q.device))
    if num_splits > 1:
        _prefill_merge_kernel[(*tiles, num_heads)](
            query_start_loc, seq_lens, tile_arg, out, m, l_sum, acc, num_splits, min_tiles, out.stride(0),
            out.stride(1), num_tokens * num_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
            TILE_MAP=tile_map is not None, num_warps=4, **pdl_launch(q.device))
    return out
