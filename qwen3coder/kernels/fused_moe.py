"""Fused mixture-of-experts in Triton: tokens sorted by expert, grouped GEMMs, no per-expert loop.

`moe_align(topk_ids)` lays the (token, k) pairs out expert by expert, each expert's run padded to a
multiple of BLOCK_M, entirely with device ops (no host sync: CUDA-graph safe). Two grouped GEMMs then
run over those blocks — gate and up tiles of `x @ W13[e]^T` with SwiGLU in the epilogue, then
`h @ W2[e]^T` scaled by the routing weight — so each program reads one tile of one expert's weights,
and an expert's weights are read once per BLOCK_M tokens routed to it, whatever the batch. The same
path serves decode (one token: the top-k experts' weights read once) and prefill (tokens grouped per
expert). The SwiGLU output `h` is kept in the aligned order (row i of `h` is the pair `sorted_ids[i]`;
padding rows are never written nor used), so the down projection reads each block's rows as one
contiguous tile. With `GemmTiles.tma` (the prefill tiles, on GPUs with a tensor memory accelerator, and
Triton's interpreter) the weight tiles, and the down projection's `h` tiles, are loaded through TMA
tensor descriptors instead of per-thread address arithmetic; the gathered token rows of the gate/up
GEMM cannot be.
`moe_forward_reference` in `qwen3coder.models.layers.moe` is the plain-PyTorch reference.
On the Triton path `qwen3coder.kernels.moe_routing.route_align` produces the routing and the same
alignment (one launch for decode-sized batches, three for prefill-sized ones); `fused_moe` then takes
its `sorted_ids` / `block_expert`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from qwen3coder.kernels.moe_gemv import moe_gemv, moe_gemv_config
from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host-side tensor descriptors
    TensorDescriptor = None


@dataclass(frozen=True)
class GemmTiles:
    """Launch configuration of one grouped-GEMM kernel (BLOCK_M is the alignment's `block_m`).

    `group_m`: the program order. Programs walk `group_m` row blocks across every column tile before
    the next rows (the grouped order of Triton's matmul tutorial), so a row block's activations stay
    in L2 while its column tiles run; 0 walks all row blocks first (each weight tile is then read by
    its expert's row blocks at the same time)."""
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 0
    tma: bool = False  # weight (and the down projection's activation) tiles through TMA descriptors


@dataclass(frozen=True)
class MoETiles:
    gate_up: GemmTiles = GemmTiles()
    down: GemmTiles = GemmTiles()


# From `benchmarks/bench_moe_tiles.py` on an H200 at the Qwen3-30B-A3B MoE shape (hidden 2048, 128 experts,
# top-8, width 768; benchmarks/results/moe_tiles_30b-a3b-*.json): µs per call, default 64x64 tiles -> these
#   batch 1    gate_up 21.0 -> 15.6, down 10.0 -> 8.9   (few blocks: long K steps and deep pipelines)
#   batch 16   gate_up 128  -> 113,  down 63.1 -> 59.4  (~4.2 TB/s: at the copy bandwidth)
#   batch 64   gate_up 192  -> 181,  down 99.0 -> 95.6
#   8192 tok   gate_up 1050 -> 882,  down 1006 -> 627   (BLOCK_M 128: compute-bound, larger tiles)
# Batch 1 re-measured in the engine (decode graphs with programmatic dependent launch, 2026-11-30):
# gate_up 8 warps and down 256-wide K steps took batch-1 decode from 317 to 324 tok/s (of five tile
# sets tried in `qwen3coder bench`; 16-wide gate_up tiles lost: 296).
# Prefill chunks (2026-11-30, tenth session; …T152915, …T153446, …T153550, …T153613): the down projection's
# activations (pairs x 768) outgrow the L2 at prefill sizes, so walking a row block across all its column
# tiles first (`group_m=1`) pays: 8,192 tokens 633 / 615 -> 478 / 455 µs (two runs); gate_up's gathered
# token rows fit the L2 anyway (even within run-to-run noise: 787-848 vs 805-844). BLOCK_M 64 tiles from
# 129 tokens: 256 tokens gate_up 206 -> 189, down 110 -> 105; 512 tokens 285 -> 193, 151 -> 108 (at
# 4.2 TB/s); 128 tokens stays on the decode tiles (183 / 99 µs, none better). BLOCK_M 128 from 16,384
# pairs: 2,048 tokens gate_up 332 -> 292, down 233 -> 167.
_DECODE_TINY = MoETiles(GemmTiles(64, 128, 8, 5), GemmTiles(64, 256, 4, 3))
_DECODE = MoETiles(GemmTiles(32, 256, 4, 3), GemmTiles(64, 128, 4, 3))
# Eleventh session (moe_tma_prototype_30b-a3b-20261130T164800.json): the SwiGLU output in the aligned order,
# so the down projection's activation tiles are contiguous, and TMA descriptors for the prefill tiles'
# weights (and the down projection's activations): 8,192 tokens gate_up 919 -> 860 µs, down 494 -> 420
# (256-wide tiles), 2,048 tokens down 197 -> 163; 512 tokens even (the 64-row tiles keep pointer loads).
# Both GEMMs against the previous kernels in one process (moe_ab_30b-a3b-20261130T170000.json, medians of
# 7): 8,192 tokens 1,538 -> 1,386 µs, 4,096 866 -> 794, 2,048 503 -> 472; decode sizes within 0.3%.
_MID = MoETiles(GemmTiles(64, 64, 4, 3, group_m=1), GemmTiles(128, 64, 8, 4, group_m=1))
_PREFILL = MoETiles(GemmTiles(128, 64, 8, 4, group_m=1, tma=True), GemmTiles(256, 64, 8, 3, group_m=1, tma=True))
# Tiers by the mean rows an expert gets (pairs / experts), swept at 128 experts; checked at the 480B's 160
# experts (width 2560, hidden 6144) and Coder-Next's 512 (width 512, top-10) with `bench_moe_tiles.py --tiers`
# (moe_tiles_480b-a35b-20261130T171659.json, moe_tiles_next-80b-a3b-20261130T171644.json): at 16-8,192 tokens
# each shape's tier was the fastest of the three for both GEMMs but one: the 480B at 256 tokens (12.8 rows an
# expert) ran both GEMMs in 3,844 µs on the decode tiles against 3,981 on the BLOCK_M 64 ones.
DECODE_MAX_ROWS = 8  # up to 8 rows per expert (1,024 pairs at 128 experts): the decode tiles, BLOCK_M 16
MID_MAX_ROWS = 64  # ... up to 64 (8,192 pairs): BLOCK_M 64; beyond: BLOCK_M 128


def moe_tiles(num_pairs: int, num_experts: int) -> MoETiles:
    """Launch tiles of the two grouped GEMMs for `num_pairs` (token, expert) pairs over `num_experts`."""
    if num_pairs <= 32:
        return _DECODE_TINY
    if num_pairs <= DECODE_MAX_ROWS * num_experts:
        return _DECODE
    return _MID if num_pairs <= MID_MAX_ROWS * num_experts else _PREFILL


def moe_block_m(num_pairs: int, num_experts: int) -> int:
    """BLOCK_M (token rows per grouped-GEMM tile) for `num_pairs` (token, expert) pairs over
    `num_experts`: 16 for decode batches (an expert gets a few rows), larger for prefill where experts
    get dozens to hundreds."""
    if num_pairs <= DECODE_MAX_ROWS * num_experts:
        return 16
    return 64 if num_pairs <= MID_MAX_ROWS * num_experts else 128


# Tried and dropped (2026-11-30): decode batches without an alignment, each grouped-GEMM program owning an
# expert and finding its tokens in topk_ids (the routing then only the top-k). Slower on an H200 at 30B-A3B
# decode: batch 4 735 vs 746 tok/s, 16 1,388 vs 1,461, 64 3,793 vs 3,866 (a grid over all 128 experts and
# the per-program token search cost more than the one-program alignment it saved;
# benchmarks/results/decode_variants_30b-a3b-20261130T143323.json, `baseline` = that mode there).


def moe_align_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static length P of `sorted_ids`: every pair plus the padding of at most min(E, pairs) runs."""
    total = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return (total + block_m - 1) // block_m * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P], block_expert [P/block_m]) for the flattened (token, k) pairs.

    `sorted_ids` holds pair indices grouped by expert, each group padded to a multiple of `block_m`
    with the sentinel `num_pairs`; `block_expert[b]` is the expert of block b, -1 past the end.
    P = num_pairs + min(num_experts, num_pairs) * (block_m - 1) rounded up to block_m: static for a given
    batch (decode at batch 1 with top-8: 8 blocks, not one per expert).
    """
    flat = topk_ids.flatten().long()  # int32 ids (the Triton routing's) as well
    num_pairs = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=dev) - (counts.cumsum(0) - counts)[experts_sorted]
    total = moe_align_length(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((total,), num_pairs, dtype=torch.long, device=dev)
    sorted_ids[pad_start[experts_sorted] + rank] = order
    block_starts = torch.arange(0, total, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_ids, block_expert


if triton is not None:

    @triton.jit
    def _program_tile(num_pid_n, GROUP_M: tl.constexpr):
        """(row block, column tile) of this program. GROUP_M 0: the 2-D grid (row blocks, column tiles),
        row blocks fastest. Otherwise a 1-D grid of num_pid_m * num_pid_n programs in groups of GROUP_M
        row blocks, row blocks fastest inside a group. A compile-time constant: a runtime value would be
        specialised by Triton (== 1, multiple of 16), so a new row-block count could compile mid-serving."""
        if GROUP_M == 0:
            pid_m = tl.program_id(0)
            pid_n = tl.program_id(1)
        else:
            pid = tl.program_id(0)
            num_pid_m = tl.num_programs(0) // num_pid_n
            in_group = GROUP_M * num_pid_n
            first_m = (pid // in_group) * GROUP_M
            size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + (pid % in_group) % size_m
            pid_n = (pid % in_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _down_proj_kernel(h_ptr, h_desc, w_ptr, w_desc, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr,
                          num_pairs, n_out, k_in, stride_hm, stride_we, stride_wn, stride_om, num_pid_n,
                          GROUP_M: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr):
        """out[sorted_ids[i], n] = weight[pair] * sum_k h[i, k] * W2[expert, n, k] for the rows i of a block
        (h in the aligned order). TMA: h tiles from `h_desc` ([P, K_in], blocks [BLOCK_M, BLOCK_K]) and weight
        tiles from `w_desc` (W2 as [E * n_out, K_in], blocks [BLOCK_N, BLOCK_K]); out-of-range elements
        read as 0 and columns past n_out (the next expert's rows) are never stored."""
        pdl_prologue(PDL)
        pid_m, pid_n = _program_tile(num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        row_ok = pair < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        w_row = (expert * n_out + pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(0, k_in, BLOCK_K):
            k_ok = (k0 + ks) < k_in
            if TMA:
                h = h_desc.load([(pid_m * BLOCK_M).to(tl.int32), k0])
                w = w_desc.load([w_row, k0]).T  # [BLOCK_K, BLOCK_N]
            else:
                h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + (k0 + ks)[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + (k0 + ks)[:, None],
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            if IEEE:
                acc += tl.dot(h, w, input_precision="ieee")
            else:
                acc += tl.dot(h, w)
        rw = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + cols[None, :],
                 (acc * rw[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _gate_up_swiglu_kernel(x_ptr, w_ptr, w_desc, act_ptr, sorted_ids_ptr, block_expert_ptr, num_pairs, inter,
                               k_in, stride_xm, stride_we, stride_wn, stride_am, num_pid_n, GROUP_M: tl.constexpr,
                               TOP_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
                               PDL: tl.constexpr):
        """act[i, j] = silu(x[token] . W13[e, j]) * (x[token] . W13[e, inter + j]) for the rows i of a block
        (the aligned order; token = sorted_ids[i] // TOP_K; padding rows not written): gate and up tiles in
        one program, so the [pairs, 2I] intermediate never goes to memory. TMA: weight tiles from `w_desc`
        (W13 as [E * 2I, K_in], blocks [BLOCK_N, BLOCK_K])."""
        pdl_prologue(PDL)
        pid_m, pid_n = _program_tile(num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        row_ok = pair < num_pairs
        token = pair // TOP_K
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        ks = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        w_row = (expert * 2 * inter + pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(0, k_in, BLOCK_K):
            k_ok = (k0 + ks) < k_in
            a = tl.load(x_ptr + token[:, None].to(tl.int64) * stride_xm + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if TMA:  # columns past inter read the up rows / the next expert: never stored
                wg = w_desc.load([w_row, k0]).T
                wu = w_desc.load([w_row + inter, k0]).T
            else:
                wmask = col_ok[None, :] & k_ok[:, None]
                wg = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + (k0 + ks)[:, None], mask=wmask,
                             other=0.0)
                wu = tl.load(w_base + (cols + inter)[None, :].to(tl.int64) * stride_wn + (k0 + ks)[:, None],
                             mask=wmask, other=0.0)
            if IEEE:
                acc_g += tl.dot(a, wg, input_precision="ieee")
                acc_u += tl.dot(a, wu, input_precision="ieee")
            else:
                acc_g += tl.dot(a, wg)
                acc_u += tl.dot(a, wu)
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(act_ptr + rows[:, None].to(tl.int64) * stride_am + cols[None, :],
                 act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on `device` (None off CUDA: the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def fit_tiles(t: GemmTiles, n_out: int, k_in: int, block_m: int, dtype: torch.dtype, weight_tiles: int,
              device: torch.device) -> GemmTiles:
    """`t` clamped to the problem and the device: tiles no larger than needed (tiny test shapes), then
    fewer pipeline stages (down to 2), then narrower K steps, until the stages' operand tiles (the
    activation tile and `weight_tiles` weight tiles per stage) fit in shared memory. fp32 needs twice
    bf16's room: the decode tiles tuned for bf16 do not fit in fp32 at their stage counts."""
    bn = min(t.block_n, max(16, triton.next_power_of_2(n_out)))
    bk = min(t.block_k, max(16, triton.next_power_of_2(k_in)))
    stages, limit, size = t.num_stages, _smem_limit(device), torch.finfo(dtype).bits // 8

    def smem(stages: int, bk: int) -> int:
        return stages * (block_m + weight_tiles * bn) * bk * size

    if limit is not None:
        while stages > 2 and smem(stages, bk) > limit:
            stages -= 1
        while bk > 16 and smem(stages, bk) > limit:
            bk //= 2
    return GemmTiles(bn, bk, t.num_warps, stages, t.group_m, t.tma and _tma_ok(device))


@functools.lru_cache(maxsize=None)
def _tma_ok(device: torch.device) -> bool:
    """Whether `device` loads tiles through TMA descriptors: NVIDIA Hopper or later, or Triton's interpreter
    (not ROCm, whose capability numbers mean other GPUs)."""
    if TensorDescriptor is None:
        return False
    if device.type == "cuda":
        return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)
    return os.environ.get("TRITON_INTERPRET") == "1"


def _descriptor(t: torch.Tensor, rows: int, block: list[int], use: bool) -> "TensorDescriptor | None":
    """`t` viewed as a 2-D [rows, last dim] tensor, described for TMA loads of `block` tiles; None without
    `use` or where TMA cannot address it (non-contiguous rows, strides or base not 16-byte aligned)."""
    if not use:
        return None
    cols = t.shape[-1]
    if not t.is_contiguous() or (cols * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return TensorDescriptor.from_tensor(t.view(rows, cols), block)


def _grid(block_expert: torch.Tensor, n_out: int, t: GemmTiles) -> tuple[tuple[int, ...], int]:
    """The kernels' grid and column tiles (`_program_tile`: 2-D for `group_m` 0, else 1-D)."""
    num_pid_m, num_pid_n = block_expert.numel(), triton.cdiv(n_out, t.block_n)
    return ((num_pid_m, num_pid_n) if t.group_m == 0 else (num_pid_m * num_pid_n,)), num_pid_n


def launch_gate_up(x: torch.Tensor, gate_up_proj: torch.Tensor, act: torch.Tensor, sorted_ids: torch.Tensor,
                   block_expert: torch.Tensor, top_k: int, block_m: int, tiles: GemmTiles, num_pairs: int) -> None:
    """act[i] = SwiGLU of the pair sorted_ids[i] (`_gate_up_swiglu_kernel`, launch configuration `tiles`):
    `act` [len(sorted_ids), I] in the aligned order; its padding rows are left as they are."""
    assert act.shape[0] == sorted_ids.numel(), "act holds one row per aligned slot"
    inter, hidden = gate_up_proj.shape[1] // 2, x.shape[1]
    t = fit_tiles(tiles, inter, hidden, block_m, x.dtype, 2, x.device)
    grid, num_pid_n = _grid(block_expert, inter, t)
    w_desc = _descriptor(gate_up_proj, gate_up_proj.shape[0] * 2 * inter, [t.block_n, t.block_k], t.tma)
    _gate_up_swiglu_kernel[grid](
        x, gate_up_proj, w_desc, act, sorted_ids, block_expert, num_pairs, inter, hidden, x.stride(0),
        gate_up_proj.stride(0), gate_up_proj.stride(1), act.stride(0), num_pid_n, GROUP_M=t.group_m, TOP_K=top_k,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        TMA=w_desc is not None, num_warps=t.num_warps, num_stages=t.num_stages, **pdl_launch(x.device))


def launch_down(act: torch.Tensor, down_proj: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
                block_expert: torch.Tensor, topk_weights: torch.Tensor, block_m: int, tiles: GemmTiles) -> None:
    """out[pair] = weight[pair] * act[i] @ W2[expert]^T for pair = sorted_ids[i] (`_down_proj_kernel`,
    configuration `tiles`); `act` in the aligned order (`launch_gate_up`), `out` [pairs, H], `topk_weights`
    flat and contiguous, one per pair."""
    hidden, inter = down_proj.shape[1], down_proj.shape[2]
    t = fit_tiles(tiles, hidden, inter, block_m, act.dtype, 1, act.device)
    grid, num_pid_n = _grid(block_expert, hidden, t)
    w_desc = _descriptor(down_proj, down_proj.shape[0] * hidden, [t.block_n, t.block_k], t.tma)
    h_desc = _descriptor(act, act.shape[0], [block_m, t.block_k], w_desc is not None)
    tma = w_desc is not None and h_desc is not None
    _down_proj_kernel[grid](
        act, h_desc if tma else None, down_proj, w_desc if tma else None, out, sorted_ids, block_expert,
        topk_weights, out.shape[0], hidden, inter, act.stride(0), down_proj.stride(0), down_proj.stride(1),
        out.stride(0), num_pid_n, GROUP_M=t.group_m, IEEE=act.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, TMA=tma, num_warps=t.num_warps, num_stages=t.num_stages,
        **pdl_launch(act.device))


def fused_moe(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, block_m: int = 16,
              sorted_ids: torch.Tensor | None = None, block_expert: torch.Tensor | None = None,
              tiles: MoETiles | None = None, reduce: bool = True) -> torch.Tensor:
    """Σ_k w_k · SwiGLU_{id_k}(x) for x [N, H]; weights as in `Experts` ([E, 2I, H], [E, H, I]).

    `sorted_ids` / `block_expert` (int32 or int64), when given, are `moe_align(topk_ids, E, block_m)`
    computed beforehand (e.g. by `route_align`); otherwise they are computed here. `tiles`: the
    kernels' launch configuration (default `moe_tiles(pairs, E)`). Without `tiles`, the row counts that
    `kernels.moe_gemv.TUNED` lists take that module's two GEMVs (no alignment needed). `reduce=False`
    returns the weighted per-expert partials [N, K, H] (w_k · SwiGLU_{id_k}(x), in x's dtype) instead
    of their sum, for `kernels.rmsnorm.fused_add_rmsnorm` to sum as it adds the residual.
    """
    assert triton is not None, "triton is not installed"
    n, k = topk_ids.shape
    gemv_cfg = moe_gemv_config(n, x, gate_up_proj) if tiles is None else None
    if gemv_cfg is not None:  # decode rows listed in moe_gemv.TUNED: two register-tile GEMVs instead
        return moe_gemv(x, gate_up_proj, down_proj, topk_weights, topk_ids, gemv_cfg, reduce=reduce)
    num_experts, two_i, _ = gate_up_proj.shape
    x = x.contiguous()
    if sorted_ids is None or block_expert is None:
        sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    assert sorted_ids.numel() == block_expert.numel() * block_m, "alignment made with another block_m"
    inter, pairs = two_i // 2, n * k
    tiles = tiles or moe_tiles(pairs, num_experts)
    # one row per aligned slot (padding rows unused); fp32 stays exact (IEEE dots, no TF32)
    act = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
    launch_gate_up(x, gate_up_proj, act, sorted_ids, block_expert, k, block_m, tiles.gate_up, pairs)
    out = torch.empty(pairs, down_proj.shape[1], dtype=x.dtype, device=x.device)
    launch_down(act, down_proj, out, sorted_ids, block_expert, topk_weights.flatten().contiguous(), block_m,
                tiles.down)
    # The sum over the top-k is not done in the down projection: float atomics would need a zeroed
    # fp32 buffer and a cast back (no fewer launches, and non-deterministic). In the models it is
    # folded into the next fused add+RMSNorm (`reduce=False`, see `SparseMoeBlock.fold_topk_sum`),
    # which reads the K partials instead of one row: no launch of its own. Standalone it is one
    # reduction kernel (fp32 accumulation, rounded once).
    partials = out.view(n, k, -1)
    return partials.sum(dim=1) if reduce else partials
