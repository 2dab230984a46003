"""Post-attention add+RMSNorm, MoE router GEMV and routing + alignment in one launch (decode batches).

At batch-1 decode a Qwen3-MoE layer enters its FFN through three dependent, latency-bound launches
(2-4 µs each on an H200): the add+RMSNorm of the attention output into the residual
(`kernels.rmsnorm`), the router GEMV `logits = x W_gate^T` (2048 -> 128: 0.5 MB), and the routing
(`kernels.moe_routing.fused_route_align`). `fused_norm_router_route` does all three in one grid of
`cdiv(E, BLOCK_E) x N` programs, program (p, row) owning BLOCK_E experts' router rows for one token row:

1. its router rows are loaded first — weights, which no kernel writes, so before the
   programmatic-dependent-launch wait (`kernels.pdl`): the read overlaps the previous kernel;
2. it computes the add+RMSNorm of its row (`rmsnorm.add_rmsnorm_row`: the same code as the norm
   kernel; a row of H is cheap to repeat per expert block); programs (0, row) store the new residual
   and the normed row (the experts' input);
3. its experts' logits for the row: fp32 dot products of the normed row with its router rows, rounded
   to the activation dtype (the router `Linear`'s output dtype), stored to `router_logits [N, E]`;
4. each program then counts itself on an arrival counter (a CTA barrier, then an acquire-release
   atomic: a program's logits stores happen before its arrival, and the last arriver's loads after
   it); the last program to arrive runs the one-program routing over all N rows
   (`moe_routing.route_align_rows`: softmax, top-k, renormalisation, and — unless the caller needs
   none, as the MoE GEMVs of `kernels.moe_gemv` — the expert-sorted layout) and resets the counter
   to 0, so one counter serves every layer, step and graph replay (launches of this kernel never
   overlap: each waits for its predecessor, and so for every earlier kernel, before touching memory).

One row per program, not a loop over rows in each program: with a loop, a batch of 16 paid 16 serial
row latencies (H200, 30B-A3B decode: batch 1 331 -> 343 tok/s but batch 16 1,457 -> 1,348).

Numerics. The new residual is bitwise the norm kernel's; the normed rows equal it except where the
variance's fp32 sum, reduced in this kernel's own order, rounds differently (one bf16 ulp, rarely);
the logits are fp32 sums in another order than the router GEMM's (cuBLAS or the skinny kernel), so a
logit can differ by one ulp of the activation dtype, which can change a top-k choice only between
near-tied experts. Routing from the returned logits is exactly `route` + `moe_align` on them
(tests/test_kernel_norm_router.py). `models.layers.moe.SparseMoeBlock.forward_with_norm` takes this
path (H200, 30B-A3B decode, tok/s at batch 1 / 2 / 4 / 16: 333 / 505 / 743 / 1,457 unfused, 342 / 517 /
749 / 1,463 fused); `QWEN3CODER_FUSED_ROUTER=0` turns it off.
"""

from __future__ import annotations

import torch

from qwen3coder.kernels.moe_routing import RoutedPairs, fused_routing_fits, route_align_buffers
from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.moe_routing import route_align_rows
    from qwen3coder.kernels.pdl import pdl_prologue
    from qwen3coder.kernels.rmsnorm import add_rmsnorm_row
except ImportError:  # pragma: no cover
    triton = None

MAX_TOKENS = 16  # rows; every program normalises all of them
ROUTER_TILE = 16384  # BLOCK_E * H_PAD router weights a program holds in registers
# ... for batches of up to SMALL_ROWS rows: twice the programs, each with half the router rows. H200,
# 30B-A3B decode (benchmarks/bench_decode_variants.py, decode_variants_30b-a3b-20261130T122251 / T122414 /
# T122925.json), batch 1: 8K tiles 388.6-394.4 tok/s (mean 389.8, 6 runs) vs 16K 382.1-391.5 (mean 384.9,
# 8 runs); batch 2: 541-548 (mean 546) vs 540-547 (mean 543) — each run is within ~1% noise, the means
# differ by 1.3% / 0.6%. At batch 16 8K measured 1,476 vs 1,486-1,487 and at batch 10 (2K context) even,
# so larger batches keep ROUTER_TILE. 4K tiles: 384 at batch 1; 2K: 1,428 at batch 16.
ROUTER_TILE_SMALL = 8192
SMALL_ROWS = 2

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _arrival_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per device; every launch leaves it at 0 again."""
    counter = _COUNTERS.get(device)
    if counter is None:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), \
            "the arrival counter must be allocated before CUDA-graph capture (run the step once eagerly)"
        counter = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def norm_router_fits(num_tokens: int, hidden: int, num_experts: int, top_k: int) -> bool:
    """Whether `fused_norm_router_route` takes this batch: decode-sized, and the one-program routing fits."""
    return (triton is not None and 1 <= num_tokens <= MAX_TOKENS and hidden <= ROUTER_TILE
            and fused_routing_fits(num_tokens, num_experts, top_k))


if triton is not None:

    @triton.jit
    def _norm_router_route_kernel(x_ptr, res_ptr, norm_w_ptr, out_ptr, res_out_ptr, router_w_ptr, logits_ptr,
                                  counter_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, block_expert_ptr,
                                  num_tokens, n_cols, num_experts, eps, stride_x, stride_xk, stride_r,
                                  stride_rw, num_slots, num_blocks, ZERO_CENTERED: tl.constexpr,
                                  NUM_PARTIALS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                                  TOP_K: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  N_PAD: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                                  RUN_BLOCKS: tl.constexpr, SLOTS_PAD: tl.constexpr,
                                  BLOCKS_PAD: tl.constexpr, PACKED_TOPK: tl.constexpr, ALIGN: tl.constexpr,
                                  PDL: tl.constexpr):
        """Program (p, row): router rows [p*BLOCK_E, (p+1)*BLOCK_E) for one token row; see the module docstring."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = experts < num_experts
        w = tl.load(router_w_ptr + experts[:, None].to(tl.int64) * stride_rw + cols[None, :],
                    mask=e_ok[:, None] & mask[None, :], other=0.0).to(tl.float32)  # weights: before the wait
        pdl_prologue(PDL)
        row = tl.program_id(1)  # N <= MAX_TOKENS rows of H <= ROUTER_TILE: int32 offsets
        y, x = add_rmsnorm_row(x_ptr, res_ptr, norm_w_ptr, out_ptr, row, cols, mask, n_cols, eps, stride_x,
                               stride_xk, stride_r, True, ZERO_CENTERED, NUM_PARTIALS, BLOCK)
        if pid == 0:
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
            tl.store(out_ptr + row * n_cols + cols, y, mask=mask)
        logit = tl.sum(w * y.to(tl.float32)[None, :], axis=1)  # [BLOCK_E] fp32
        tl.store(logits_ptr + row * num_experts + experts, logit.to(logits_ptr.dtype.element_ty), mask=e_ok)
        # a scalar atomic is issued by one thread: the CTA barrier first makes every thread's logits stores
        # part of what its release publishes
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:  # the last: every program's logits are stored
            route_align_rows(logits_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, block_expert_ptr, num_tokens,
                             num_experts, num_experts, num_slots, num_blocks, TOP_K, NORM, BLOCK_M, N_PAD,
                             E_PAD, K_PAD, RUN_BLOCKS, SLOTS_PAD, BLOCKS_PAD, ALIGN, PACKED_TOPK)
            tl.store(counter_ptr, 0)


def fused_norm_router_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            zero_centered: bool, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
                            block_m: int, align: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutedPairs]:
    """(normed [N, H], new residual [N, H], router_logits [N, E], routing) in one launch, for
    `x` [N, H] or unsummed partials [N, K, H] (as `fused_add_rmsnorm` takes them) plus `residual`
    [N, H], the norm's weight, and the router weight [E, H]; `norm_router_fits` must hold. The
    routing is that of `route_align(router_logits, top_k, norm_topk_prob, block_m, residual.dtype)`;
    without `align` only its weights and ids (sorted_ids and block_expert None: the MoE GEMVs of
    `kernels.moe_gemv` do not read them, so the last program skips that work)."""
    assert triton is not None, "triton is not installed"
    n, hidden = residual.shape
    num_experts = router_weight.shape[0]
    assert norm_router_fits(n, hidden, num_experts, top_k), (n, hidden, num_experts, top_k)
    assert router_weight.shape == (num_experts, hidden) and router_weight.stride(1) == 1
    assert block_m >= 2 and block_m & (block_m - 1) == 0, block_m
    residual = residual.contiguous()
    if x.dim() == 3:
        assert x.shape[0] == n and x.shape[2] == hidden and x.stride(2) == 1, (x.shape, residual.shape)
        num_partials, stride_xk = x.shape[1], x.stride(1)
    else:
        assert x.shape == residual.shape, (x.shape, residual.shape)
        x = x.contiguous()
        num_partials, stride_xk = 0, 0
    dev = residual.device
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    logits = torch.empty(n, num_experts, dtype=residual.dtype, device=dev)
    routed, launch = route_align_buffers(n, num_experts, top_k, norm_topk_prob, block_m, residual.dtype, dev,
                                         align)
    aligned = (routed.sorted_ids, routed.block_expert) if align else (routed.topk_ids, routed.topk_ids)
    block = triton.next_power_of_2(hidden)
    tile = ROUTER_TILE_SMALL if n <= SMALL_ROWS else ROUTER_TILE
    block_e = max(1, min(triton.next_power_of_2(num_experts), max(tile, block) // block))
    _norm_router_route_kernel[(triton.cdiv(num_experts, block_e), n)](
        x, residual, norm_weight, out, res_out, router_weight, logits, _arrival_counter(dev), routed.topk_weights,
        routed.topk_ids, *aligned,
        n, hidden, num_experts, eps, x.stride(0), stride_xk, residual.stride(0), router_weight.stride(0),
        ZERO_CENTERED=zero_centered, NUM_PARTIALS=num_partials, BLOCK=block, BLOCK_E=block_e, **launch,
        ALIGN=align, num_warps=4, **pdl_launch(dev))
    return out, res_out, logits, routed
