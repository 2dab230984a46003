"""MoE routing and alignment in Triton: one launch for small batches (decode), three for large ones.

`route` (softmax in fp32, top-k, renormalisation, cast) followed by `moe_align` (counts, padded
offsets, stable sort of the pairs by expert, block -> expert map) is about twenty tiny kernels per MoE
layer at decode sizes, and at prefill sizes a top-k gather, radix sorts and scatters (~150 µs per layer
for 8192 tokens of the 30B-A3B on an H200). `route_align` picks one of two Triton paths:

`fused_route_align` (small batches, `fused_routing_fits`) does all of it in ONE program over a
[N_PAD, E_PAD] tile of router logits:

1. softmax statistics in fp32 (row max, Σ exp);
2. top-k by iterative max-and-mask: the row maximum, then the lowest column holding it;
3. weights `exp(l - max) / Σ` of the chosen experts, renormalised over the k when `norm_topk_prob`,
   cast to `out_dtype`;
4. alignment: per-expert counts (column sums of the chosen mask), runs padded to BLOCK_M, their starts
   (exclusive cumsum), each pair's rank inside its expert (exclusive cumsum down the tokens: the stable
   order of `moe_align`), and the block -> expert map. Every slot of `sorted_ids` / `block_expert` is
   written exactly once (pairs, their runs' padding, the tail), so no ordering between stores matters.

`tiled_route_align` (any batch; used past `fused_routing_fits`) splits the tokens into tiles of
`tiled_routing_tile(E)` tokens (32 at E = 128) and runs three launches:

a. per tile (one program each): steps 1-3 above, plus the tile's expert histogram hist[t, e];
b. per group of experts: an exclusive scan of hist over the tiles and each expert's total;
c. per tile: padded run starts from the totals (every program recomputes the E-long cumsum), and each
   pair's slot = run start + pairs of earlier tiles on its expert + earlier tokens of this tile on it
   (recomputed from topk_ids): the same stable (token, k) order; then the program's share of the
   blocks — `block_expert` (the runs ending at or before the block's start, counted: `moe_align`'s
   searchsorted; -1 past the last run) and the sentinel in each slot of those blocks past its run's
   pairs. Every output slot is again written exactly once: no memset, no atomics, deterministic.

Both write only device tensors of sizes fixed by the shapes (no host sync: CUDA-graph safe). Outputs
equal `route` + `moe_align` exactly (ids, sorted_ids, block_expert) and the weights up to
fp32 rounding. Ties: top-k is taken on the fp32 logits (the order of the probabilities); among equal
logits the lowest expert index comes first, so the k-th choice on a tie goes to the lower index — what
`torch.topk` on CUDA selects (it gathers ties in index order), while the order it returns tied values in
is not specified. Where two distinct logits round to the same probability, these kernels still rank the
larger logit first. Tied weights are equal, so the MoE output does not depend on the tie order.

Measured on an H200 at the 30B-A3B shape (bf16, CUDA graph; benchmarks/bench_moe_routing.py), the
one-program path: routing + alignment 62 -> 4 µs per layer at batch 1 (38 kernels -> 1), 97 -> 12 µs
at batch 64; the whole SparseMoeBlock forward 110 -> 44 µs at batch 1. The tiled path (2026-11-30,
benchmarks/results/moe_routing_30b-a3b-20261130T063700.json): 152 -> 16 µs at 1,024 tokens and
211 -> 21 µs at 8,192 tokens (55 kernels -> 3); at batch 64 it takes 18 µs against the one-program
kernel's 12, so small batches keep the one-program kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qwen3coder.kernels.fused_moe import moe_align_length

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover
    triton = None

MAX_PAIRS = 2048  # N * top_k at most
MAX_TILE = 16384  # N_PAD * E_PAD at most: one program holds the logits tile in registers


def _pow2(n: int) -> int:
    """Next power of two, at least 2 (no size-1 dimensions in the kernel's tiles)."""
    return max(2, 1 << (max(1, n) - 1).bit_length())


def fused_routing_fits(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether `fused_route_align` takes this batch (one program: small batches only; `route_align`
    sends larger ones to `tiled_route_align`)."""
    return (triton is not None and num_tokens * top_k <= MAX_PAIRS
            and _pow2(num_tokens) * _pow2(num_experts) <= MAX_TILE)


class RoutedPairs(NamedTuple):
    """Routing of N tokens to top-k experts with the expert-grouped layout of `moe_align`."""

    topk_weights: torch.Tensor  # [N, k] out_dtype, descending
    topk_ids: torch.Tensor  # [N, k] int32
    # None for both where the routing skipped the alignment (`kernels.norm_router`, for the MoE GEMVs)
    sorted_ids: torch.Tensor | None  # [P] int32: pair indices n*k + j grouped by expert, sentinel N*k
    block_expert: torch.Tensor | None  # [P / block_m] int32: the expert of each block, -1 past the end


# Top-k over int64 keys (one max per choice) for up to this many rows (padded), else a max and a min per
# choice over fp32 values. H200, 30B-A3B decode (`topk_two_reductions` of benchmarks/bench_decode_variants.py,
# benchmarks/results/decode_variants_30b-a3b-20261130T110031.json), tok/s: batch 1 376.7 -> 380.9, batch 2
# 534.0 -> 538.4 with the keys, but batch 16 1,462 -> 1,447 (16 rows x 128 experts: 16 int64 keys a thread).
PACKED_TOPK_MAX_ROWS = 2
# warps of the one-program routing by its logits tile (padded tokens x experts): (largest tile, warps) in order.
# H200, 30B-A3B decode from 1,024-token prompts (`routing_warps*` of benchmarks/bench_decode_variants.py,
# decode_variants_30b-a3b-20261130T191128.json): 8 warps from 17 tokens (4,096 entries; 4 before) took batch 32
# from 2,011-2,020 to 2,097 tok/s; 16 warps at batch 64 (3,427-3,458 vs 3,404-3,434) within the noise, not taken.
# (The tile sizes, not token counts, are the key: with more experts the step comes at fewer tokens.)
FUSED_ROUTING_WARPS: tuple[tuple[int, int], ...] = ((2048, 4), (MAX_TILE, 8))


def fused_routing_warps(tile: int) -> int:
    """`num_warps` of `fused_route_align` for a logits tile of `tile` entries (`FUSED_ROUTING_WARPS`)."""
    return next((warps for largest, warps in FUSED_ROUTING_WARPS if tile <= largest), FUSED_ROUTING_WARPS[-1][1])


if triton is not None:

    @triton.jit
    def _softmax_topk_store(logits_ptr, weights_ptr, ids_ptr, rows, num_tokens, num_experts, stride_lm,
                            TOP_K: tl.constexpr, NORM: tl.constexpr, ROWS: tl.constexpr, E_PAD: tl.constexpr,
                            K_PAD: tl.constexpr, PACKED_TOPK: tl.constexpr):
        """Rows `rows` [ROWS] of router logits: softmax in fp32, top-k by iterative max-and-mask (the lowest
        expert index first among equal logits), renormalised when NORM, stored as weights (cast) and int32 ids.
        PACKED_TOPK: each choice is one max over int64 (logit, expert) keys instead of a max over the values and
        a min over the indices of the maxima; the same choices and weights (the same fp32 operations on the same
        values). Returns `slot [ROWS, E_PAD]`: the position j of expert e in token n's top-k, or -1 (also for
        rows past `num_tokens`)."""
        cols = tl.arange(0, E_PAD)
        row_ok = rows < num_tokens
        col_ok = cols < num_experts
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lm + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        x = tl.where(col_ok[None, :], x, float("-inf"))  # padding rows stay finite (0): no NaN
        ks = tl.arange(0, K_PAD)
        top_w = tl.zeros((ROWS, K_PAD), tl.float32)
        top_id = tl.zeros((ROWS, K_PAD), tl.int32)
        slot = tl.full((ROWS, E_PAD), -1, tl.int32)
        if PACKED_TOPK:
            # one max per choice over int64 keys: the logit's bits made order-preserving as a signed int
            # (negative floats: the other 31 bits flipped; +0.0 for -0.0, which compares equal) above
            # E_PAD - 1 - expert, so the largest key is the largest logit, the lowest expert among equal ones
            bits = (x + 0.0).to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = (ordered.to(tl.int64) << 32) | (E_PAD - 1 - cols)[None, :].to(tl.int64)
            taken = tl.full((ROWS, E_PAD), -1, tl.int64) << 63  # below every key
            row_max = tl.zeros((ROWS,), tl.float32)
            for j in tl.static_range(TOP_K):
                best = tl.max(key, axis=1)
                idx = E_PAD - 1 - best.to(tl.int32)  # the low 32 bits
                hi = (best >> 32).to(tl.int32)
                m = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                if j == 0:
                    row_max = m
                hit = cols[None, :] == idx[:, None]
                slot = tl.where(hit, j, slot)
                key = tl.where(hit, taken, key)
                top_w = tl.where(ks[None, :] == j, m[:, None], top_w)  # the logits for now
                top_id = tl.where(ks[None, :] == j, idx[:, None], top_id)
            denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)
            top_w = tl.where(ks[None, :] < TOP_K, tl.exp(top_w - row_max[:, None]) / denom[:, None], 0.0)
        else:
            row_max = tl.max(x, axis=1)
            denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)
            val = x
            for j in tl.static_range(TOP_K):
                m = tl.max(val, axis=1)
                idx = tl.min(tl.where(val == m[:, None], cols[None, :], E_PAD), axis=1)  # lowest index on ties
                hit = cols[None, :] == idx[:, None]
                slot = tl.where(hit, j, slot)
                val = tl.where(hit, float("-inf"), val)
                p = tl.exp(m - row_max) / denom
                top_w = tl.where(ks[None, :] == j, p[:, None], top_w)
                top_id = tl.where(ks[None, :] == j, idx[:, None], top_id)
        if NORM:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # columns >= TOP_K hold 0
        out_off = rows[:, None] * TOP_K + ks[None, :]
        out_mask = row_ok[:, None] & (ks < TOP_K)[None, :]
        tl.store(weights_ptr + out_off, top_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
        tl.store(ids_ptr + out_off, top_id, mask=out_mask)
        return tl.where(row_ok[:, None], slot, -1)

    @triton.jit
    def _fused_route_align_kernel(logits_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, block_expert_ptr,
                                  num_tokens, num_experts, stride_lm, num_slots, num_blocks,
                                  TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  N_PAD: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                                  RUN_BLOCKS: tl.constexpr, SLOTS_PAD: tl.constexpr,
                                  BLOCKS_PAD: tl.constexpr, PACKED_TOPK: tl.constexpr, PDL: tl.constexpr):
        """One program: softmax + top-k + renorm + cast, then the alignment (see the module docstring)."""
        pdl_prologue(PDL)
        route_align_rows(logits_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, block_expert_ptr, num_tokens,
                         num_experts, stride_lm, num_slots, num_blocks, TOP_K, NORM, BLOCK_M, N_PAD, E_PAD, K_PAD,
                         RUN_BLOCKS, SLOTS_PAD, BLOCKS_PAD, True, PACKED_TOPK)

    @triton.jit
    def route_align_rows(logits_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, block_expert_ptr, num_tokens,
                         num_experts, stride_lm, num_slots, num_blocks, TOP_K: tl.constexpr, NORM: tl.constexpr,
                         BLOCK_M: tl.constexpr, N_PAD: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                         RUN_BLOCKS: tl.constexpr, SLOTS_PAD: tl.constexpr, BLOCKS_PAD: tl.constexpr,
                         ALIGN: tl.constexpr, PACKED_TOPK: tl.constexpr):
        """The body of `_fused_route_align_kernel` (also run by `kernels.norm_router`'s last program);
        without ALIGN only the routing (weights, ids), not the expert-sorted layout."""
        rows = tl.arange(0, N_PAD)
        cols = tl.arange(0, E_PAD)
        row_ok = rows < num_tokens
        slot = _softmax_topk_store(logits_ptr, weights_ptr, ids_ptr, rows, num_tokens, num_experts, stride_lm,
                                   TOP_K, NORM, N_PAD, E_PAD, K_PAD, PACKED_TOPK)

        if ALIGN:  # the expert-sorted layout: runs of BLOCK_M-padded slots per expert, in expert order
            num_pairs = num_tokens * TOP_K
            chosen = (slot >= 0) & row_ok[:, None]
            chosen_i = chosen.to(tl.int32)
            counts = tl.sum(chosen_i, axis=0)  # [E_PAD]
            padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            run_start = tl.cumsum(padded, axis=0) - padded
            rank = tl.cumsum(chosen_i, axis=0) - chosen_i  # earlier tokens on the same expert
            tl.store(sorted_ids_ptr + run_start[None, :] + rank, rows[:, None] * TOP_K + slot, mask=chosen)
            fill = tl.arange(0, BLOCK_M)
            pad_pos = counts[:, None] + fill[None, :]  # a run's padding: counts .. padded - 1
            tl.store(sorted_ids_ptr + run_start[:, None] + pad_pos,
                     tl.zeros((E_PAD, BLOCK_M), tl.int32) + num_pairs, mask=pad_pos < padded[:, None])
            used = tl.sum(padded, axis=0)
            tail = tl.arange(0, SLOTS_PAD)
            tl.store(sorted_ids_ptr + tail, tl.zeros((SLOTS_PAD,), tl.int32) + num_pairs,
                     mask=(tail >= used) & (tail < num_slots))

            run_blocks = tl.arange(0, RUN_BLOCKS)
            tl.store(block_expert_ptr + (run_start // BLOCK_M)[:, None] + run_blocks[None, :],
                     cols[:, None] + tl.zeros((E_PAD, RUN_BLOCKS), tl.int32),
                     mask=run_blocks[None, :] < (padded // BLOCK_M)[:, None])
            blocks = tl.arange(0, BLOCKS_PAD)
            tl.store(block_expert_ptr + blocks, tl.full((BLOCKS_PAD,), -1, tl.int32),
                     mask=(blocks >= used // BLOCK_M) & (blocks < num_blocks))


def fused_route_align(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, block_m: int,
                      out_dtype: torch.dtype) -> RoutedPairs:
    """`route(router_logits, top_k, norm_topk_prob, out_dtype)` + `moe_align(ids, E, block_m)` in one
    launch, for router logits [N, E] with `fused_routing_fits(N, E, top_k)`; `block_m` a power of two."""
    assert triton is not None, "triton is not installed"
    n, num_experts = router_logits.shape
    assert fused_routing_fits(n, num_experts, top_k), (n, num_experts, top_k)
    assert top_k <= num_experts and block_m >= 2 and block_m & (block_m - 1) == 0, (top_k, block_m)
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    routed, launch = route_align_buffers(n, num_experts, top_k, norm_topk_prob, block_m, out_dtype,
                                         router_logits.device)
    _fused_route_align_kernel[(1,)](
        router_logits, *routed, n, num_experts, router_logits.stride(0), **launch,
        num_warps=fused_routing_warps(launch["N_PAD"] * launch["E_PAD"]), **pdl_launch(router_logits.device))
    return routed


def route_align_buffers(n: int, num_experts: int, top_k: int, norm_topk_prob: bool, block_m: int,
                        out_dtype: torch.dtype, device: torch.device, align: bool = True
                        ) -> tuple[RoutedPairs, dict]:
    """The outputs of one-program routing (uninitialised; without `align` no alignment buffers, None in
    the tuple) and the keyword arguments of `route_align_rows` after (logits, weights, ids, sorted_ids,
    block_expert, num_tokens, num_experts, stride): shared with `kernels.norm_router`."""
    slots = moe_align_length(n * top_k, num_experts, block_m)
    weights = torch.empty(n, top_k, dtype=out_dtype, device=device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=device)
    if align:
        routed = RoutedPairs(weights, ids, torch.empty(slots, dtype=torch.int32, device=device),
                             torch.empty(slots // block_m, dtype=torch.int32, device=device))
    else:
        routed = RoutedPairs(weights, ids, None, None)
    launch = dict(num_slots=slots, num_blocks=slots // block_m, TOP_K=top_k, NORM=bool(norm_topk_prob),
                  BLOCK_M=block_m, N_PAD=_pow2(n), E_PAD=_pow2(num_experts), K_PAD=_pow2(top_k),
                  RUN_BLOCKS=_pow2(-(-n // block_m)), SLOTS_PAD=_pow2(slots), BLOCKS_PAD=_pow2(slots // block_m),
                  PACKED_TOPK=_pow2(n) <= PACKED_TOPK_MAX_ROWS)
    return routed, launch


# --- large batches (prefill): three launches over tiles of tokens ---------------------------------


def tiled_routing_tile(num_experts: int) -> tuple[int, int]:
    """(tokens per program, num_warps) of `tiled_route_align`'s top-k and scatter kernels: 4096 // E_PAD
    tokens within 2 .. 128 (32 at E = 128, 8 at E = 512), so a [tokens, E_PAD] tile of 4096 entries
    where E_PAD is 32 .. 2048; 8 warps past that."""
    e_pad = _pow2(num_experts)
    tokens = max(2, min(128, 4096 // e_pad))
    return tokens, 4 if tokens * e_pad <= 4096 else 8


if triton is not None:

    @triton.jit
    def _route_align_topk_kernel(logits_ptr, weights_ptr, ids_ptr, hist_ptr, num_tokens, num_experts,
                                 stride_lm, TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
                                 E_PAD: tl.constexpr, K_PAD: tl.constexpr, PACKED_TOPK: tl.constexpr,
                                 PDL: tl.constexpr):
        """Tile t of BLOCK_T tokens: softmax + top-k + renorm + cast as `_fused_route_align_kernel`, and
        hist[t, e] = how many of the tile's tokens chose expert e."""
        pdl_prologue(PDL)
        tile = tl.program_id(0)
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, E_PAD)
        col_ok = cols < num_experts
        slot = _softmax_topk_store(logits_ptr, weights_ptr, ids_ptr, rows, num_tokens, num_experts, stride_lm,
                                   TOP_K, NORM, BLOCK_T, E_PAD, K_PAD, PACKED_TOPK)
        chosen = (slot >= 0).to(tl.int32)
        tl.store(hist_ptr + tile * num_experts + cols, tl.sum(chosen, axis=0), mask=col_ok)

    @triton.jit
    def _route_align_scan_kernel(hist_ptr, prefix_ptr, totals_ptr, num_tiles, num_experts,
                                 E_BLOCK: tl.constexpr, T_CHUNK: tl.constexpr, PDL: tl.constexpr):
        """For E_BLOCK experts: prefix[t, e] = Σ_{t' < t} hist[t', e] (exclusive scan over the tiles)
        and totals[e] = Σ_t hist[t, e]."""
        pdl_prologue(PDL)
        cols = tl.program_id(0) * E_BLOCK + tl.arange(0, E_BLOCK)
        col_ok = cols < num_experts
        carry = tl.zeros((E_BLOCK,), tl.int32)
        for t0 in range(0, num_tiles, T_CHUNK):
            tiles = t0 + tl.arange(0, T_CHUNK)
            mask = (tiles < num_tiles)[:, None] & col_ok[None, :]
            offs = tiles[:, None] * num_experts + cols[None, :]
            h = tl.load(hist_ptr + offs, mask=mask, other=0)
            tl.store(prefix_ptr + offs, tl.cumsum(h, axis=0) - h + carry[None, :], mask=mask)
            carry += tl.sum(h, axis=0)
        tl.store(totals_ptr + cols, carry, mask=col_ok)

    @triton.jit
    def _route_align_scatter_kernel(ids_ptr, prefix_ptr, totals_ptr, sorted_ids_ptr, block_expert_ptr,
                                    num_tokens, num_experts, num_blocks, blocks_per_program,
                                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                                    E_PAD: tl.constexpr, B_CHUNK: tl.constexpr, PDL: tl.constexpr):
        """Tile t: each pair's slot in `sorted_ids` = run start of its expert + pairs of earlier tiles on
        that expert (prefix[t, e]) + earlier tokens of this tile on it. Then this program's share of the
        blocks: `block_expert` and the sentinel in every slot of them that holds no pair."""
        pdl_prologue(PDL)
        tile = tl.program_id(0)
        cols = tl.arange(0, E_PAD)
        col_ok = cols < num_experts
        counts = tl.load(totals_ptr + cols, mask=col_ok, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, axis=0)
        run_start = pad_end - padded
        data_end = run_start + counts  # a run's pairs fill run_start .. data_end - 1, its padding the rest

        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        slot = tl.full((BLOCK_T, E_PAD), -1, tl.int32)  # position j of expert e in token n's top-k, or -1
        for j in tl.static_range(TOP_K):
            idj = tl.load(ids_ptr + rows * TOP_K + j, mask=row_ok, other=-1)
            slot = tl.where(cols[None, :] == idj[:, None], j, slot)
        chosen = slot >= 0
        chosen_i = chosen.to(tl.int32)
        rank = tl.cumsum(chosen_i, axis=0) - chosen_i  # earlier tokens of this tile on the same expert
        base = run_start + tl.load(prefix_ptr + tile * num_experts + cols, mask=col_ok, other=0)
        tl.store(sorted_ids_ptr + base[None, :] + rank, rows[:, None] * TOP_K + slot, mask=chosen)

        num_pairs = num_tokens * TOP_K
        lanes = tl.arange(0, BLOCK_M)
        for c in range(0, blocks_per_program, B_CHUNK):
            local = c + tl.arange(0, B_CHUNK)
            blocks = tile * blocks_per_program + local
            ok = (local < blocks_per_program) & (blocks < num_blocks)
            start = blocks * BLOCK_M
            # the owner of a block: the number of runs ending at or before its start (moe_align's
            # searchsorted), num_experts past the last run
            owner = tl.sum(((pad_end[None, :] <= start[:, None]) & col_ok[None, :]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, tl.where(owner < num_experts, owner, -1), mask=ok)
            owner_end = tl.sum(tl.where(cols[None, :] == owner[:, None], data_end[None, :], 0), axis=1)
            pos = start[:, None] + lanes[None, :]
            pad = (pos >= owner_end[:, None]) | (owner >= num_experts)[:, None]
            tl.store(sorted_ids_ptr + pos, tl.zeros((B_CHUNK, BLOCK_M), tl.int32) + num_pairs,
                     mask=ok[:, None] & pad)


def tiled_route_align(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, block_m: int,
                      out_dtype: torch.dtype) -> RoutedPairs:
    """`fused_route_align`'s outputs for any batch, in three launches: top-k + tile histograms, an
    exclusive scan of the histograms over the tiles, the scatter into the expert-sorted layout (see the
    module docstring). No host sync, sizes fixed by the shapes: CUDA-graph safe."""
    assert triton is not None, "triton is not installed"
    n, num_experts = router_logits.shape
    assert 1 <= top_k <= num_experts and block_m >= 2 and block_m & (block_m - 1) == 0, (top_k, block_m)
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    dev = router_logits.device
    slots = moe_align_length(n * top_k, num_experts, block_m)
    num_blocks = slots // block_m
    weights = torch.empty(n, top_k, dtype=out_dtype, device=dev)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(slots, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    block_t, warps = tiled_routing_tile(num_experts)
    num_tiles = max(1, -(-n // block_t))
    hist = torch.empty(num_tiles, num_experts, dtype=torch.int32, device=dev)
    prefix = torch.empty_like(hist)
    totals = torch.empty(num_experts, dtype=torch.int32, device=dev)
    e_pad = _pow2(num_experts)
    _route_align_topk_kernel[(num_tiles,)](
        router_logits, weights, ids, hist, n, num_experts, router_logits.stride(0), TOP_K=top_k,
        NORM=bool(norm_topk_prob), BLOCK_T=block_t, E_PAD=e_pad, K_PAD=_pow2(top_k),
        PACKED_TOPK=block_t <= PACKED_TOPK_MAX_ROWS, num_warps=warps, **pdl_launch(dev))
    e_block = min(e_pad, 16)
    _route_align_scan_kernel[(-(-num_experts // e_block),)](
        hist, prefix, totals, num_tiles, num_experts, E_BLOCK=e_block,
        T_CHUNK=max(2, min(_pow2(num_tiles), 2048 // e_block)), num_warps=4, **pdl_launch(dev))
    per_program = -(-num_blocks // num_tiles)
    _route_align_scatter_kernel[(num_tiles,)](
        ids, prefix, totals, sorted_ids, block_expert, n, num_experts, num_blocks, per_program, TOP_K=top_k,
        BLOCK_M=block_m, BLOCK_T=block_t, E_PAD=e_pad,
        B_CHUNK=max(2, min(_pow2(per_program), 4096 // max(e_pad, block_m))), num_warps=warps,
        **pdl_launch(dev))
    return RoutedPairs(weights, ids, sorted_ids, block_expert)


def route_align(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, block_m: int,
                out_dtype: torch.dtype) -> RoutedPairs:
    """`route` + `moe_align` on the Triton path: one launch (`fused_route_align`) for small batches,
    three (`tiled_route_align`) otherwise."""
    n, num_experts = router_logits.shape
    if fused_routing_fits(n, num_experts, top_k):
        return fused_route_align(router_logits, top_k, norm_topk_prob, block_m, out_dtype)
    return tiled_route_align(router_logits, top_k, norm_topk_prob, block_m, out_dtype)
