"""Triton attention prologue: per-head QK RMSNorm, RoPE and the paged KV-cache store in one launch.

`fused_qk_norm_rope_store(q, k, v, ...)` replaces, for a step that uses the KV cache, the unfused
sequence of `Qwen3Attention.forward` (q/k/v split copies, `q_norm`, `k_norm`, RoPE on q and on k,
`store_kv`). A program owns a tile of `BLOCK_T` tokens × a group of heads, `[BLOCK_T, heads,
BLOCK_D]`: the query-head groups first (`Q_HEADS` heads each), then the KV-head groups (`KV_HEADS`
each); the tail tile and the heads past `Hq`/`Hk` are masked. A query program normalises its rows,
rotates them and writes them to a contiguous `q [N, Hq, D]`; a KV program does the same to the key
rows and writes them, with the value rows unchanged, into the paged cache at `slot_mapping[token]`
(slots < 0 are skipped, as in `store_kv`). The step's cos/sin rows and the norm weights are loaded
once per program and shared by its heads.

The tile shape comes from the token count (`launch_config`, host shapes only, so a captured CUDA
graph replays the same grid; nothing syncs with the host): decode-sized steps keep a program per
(token, head), as many programs as possible for a latency-bound launch; prefill steps take tiles
of ~4K elements (16 tokens × 2 heads at head_dim 128), to cut the per-program overhead and the
re-reads of cos/sin (once per head group, not per head) in a bandwidth-bound launch.

The inputs may be strided views of the packed `qkv_proj` output — for Qwen3-Next's gated attention
`q` is the `[N, Hq, D]` view whose head stride is `2 * D` (query and gate interleaved per head).
The math repeats the reference's roundings step by step, so the result matches the unfused path:
RMSNorm in fp32 (`sum(x²) / D`, `rsqrt`, as `qwen3coder.kernels.rmsnorm`), then either
`w * x̂.to(dtype)` (Qwen3) or `(x̂ * (1 + w)).to(dtype)` (zero-centred, Qwen3-Next); RoPE in the
NeoX rotate-half layout on the first `rotary_dim` channels, each product and the sum rounded to the
activation dtype as the eager `x * cos + rotate_half(x) * sin` does. `cos`/`sin` are the step's
prepared rows `[N, rotary_dim]` (`RotaryEmbedding.step_cos_sin`); channels past `rotary_dim` pass
through. The rotate-half partner of channel `d` is loaded directly (`d ± rotary_dim/2`: a second
read of rows the program has just read, so it comes from cache), so no in-register shuffles are
needed; the partner offsets carry contiguity hints so that this load can vectorise like the first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None


class QKRopeLaunch(NamedTuple):
    """Tile of one program: `block_t` tokens × `q_heads` query heads (or `kv_heads` KV heads), all
    powers of two, and the warps that run it."""

    block_t: int
    q_heads: int
    kv_heads: int
    num_warps: int


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_config(n: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> QKRopeLaunch:
    """The tile for `n` tokens (host shapes only). Up to 16 tokens: one (token, head) per program, the
    grid of the launch before tiling (decode: many small programs). Up to 64: 4 tokens × 1 head.
    Beyond: ~4K-element tiles of 2 heads (16 tokens at head_dim 128; cos/sin and the weights read once
    per 2 heads). Warps: one per 512 tile elements (16 per thread), at least 1 and at most 8. From
    `benchmarks/bench_qk_norm_rope.py` on an H200 at the 30B-A3B shape (2026-11-30): 16 tokens × 2 heads
    was the best of 10 tiles at 1,024 and 8,192 tokens (6.3 / 49 µs; one program per (token, head):
    25 / 188 µs); decode sizes (1, 16 tokens) 1.3 / 1.7 µs."""
    block_d = _pow2(head_dim)
    if n <= 16:
        block_t, heads = 1, 1
    elif n <= 64:
        block_t, heads = 4, 1
    else:
        heads = 2
        block_t = max(1, min(64, 4096 // (block_d * heads)))
    q_heads, kv_heads = min(heads, _pow2(num_q_heads)), min(heads, _pow2(num_kv_heads))
    num_warps = max(1, min(8, block_t * max(q_heads, kv_heads) * block_d // 512))
    return QKRopeLaunch(block_t, q_heads, kv_heads, num_warps)


if triton is not None:

    @triton.jit
    def _norm_rope_tile(rows, row_mask, w_ptr, cos, sin, eps, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, HALF_ALIGN: tl.constexpr, ZERO_CENTERED: tl.constexpr):
        """Rows `[BLOCK_T, BLOCK_H, 1]` (pointers to channel 0; unit channel stride), `row_mask` alike;
        cos/sin `[BLOCK_T, 1, BLOCK_D]` fp32 (0 past ROT_DIM) -> RMSNorm then RoPE, in the rows' dtype."""
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        # rotate-half partner: d + R/2 in the first half (negated), d - R/2 in the second; contiguous
        # in aligned runs of HALF_ALIGN channels (a power of two dividing R/2), so loads vectorise
        rot = d < ROT_DIM
        first = d < ROT_DIM // 2
        partner = tl.where(first, d + ROT_DIM // 2, d - ROT_DIM // 2)
        partner = tl.max_contiguous(tl.multiple_of(partner, HALF_ALIGN), HALF_ALIGN)
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, None, :]
        wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)[None, None, :]
        x = tl.load(rows + d[None, None, :], mask=row_mask & d_mask[None, None, :], other=0.0)
        xp = tl.load(rows + partner[None, None, :], mask=row_mask & rot[None, None, :], other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=2) / HEAD_DIM + eps)[:, :, None]
        if ZERO_CENTERED:
            y = (xf * rstd * (1.0 + w)).to(x.dtype).to(tl.float32)
            yp = (xp * rstd * (1.0 + wp)).to(x.dtype).to(tl.float32)
        else:
            y = (w * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
            yp = (wp * (xp * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
        a = (y * cos).to(x.dtype).to(tl.float32)
        b = (yp * sin).to(x.dtype).to(tl.float32)
        roped = (a + tl.where(first[None, None, :], -b, b)).to(x.dtype)
        return tl.where(rot[None, None, :], roped, y.to(x.dtype))

    @triton.jit
    def _qk_norm_rope_store_kernel(q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr,
                                   q_out_ptr, k_cache_ptr, v_cache_ptr, eps, num_tokens, num_q_heads,
                                   num_kv_heads, num_q_groups,
                                   stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                                   stride_cos, stride_sin, stride_on, stride_oh, stride_cs, stride_ch,
                                   HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_T: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                                   HALF_ALIGN: tl.constexpr, ZERO_CENTERED: tl.constexpr, PDL: tl.constexpr):
        """Program (token tile, head group): groups [0, num_q_groups) take Q_HEADS query heads each, the
        rest KV_HEADS KV heads each, over the tile's BLOCK_T tokens (tail tile and heads masked)."""
        pdl_prologue(PDL)
        tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = tok < num_tokens
        tok = tok.to(tl.int64)
        group = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d3 = d[None, None, :]
        rot = d < ROT_DIM
        cs_mask = t_mask[:, None] & rot[None, :]
        cos = tl.load(cos_ptr + tok[:, None] * stride_cos + d[None, :], mask=cs_mask, other=0.0)
        sin = tl.load(sin_ptr + tok[:, None] * stride_sin + d[None, :], mask=cs_mask, other=0.0)
        cos = cos.to(tl.float32)[:, None, :]
        sin = sin.to(tl.float32)[:, None, :]
        if group < num_q_groups:
            head = group * Q_HEADS + tl.arange(0, Q_HEADS)
            row_mask = (t_mask[:, None] & (head < num_q_heads)[None, :])[:, :, None]
            rows = q_ptr + (tok[:, None] * stride_qn + head[None, :] * stride_qh)[:, :, None]
            y = _norm_rope_tile(rows, row_mask, q_w_ptr, cos, sin, eps, HEAD_DIM, ROT_DIM, BLOCK_D,
                                HALF_ALIGN, ZERO_CENTERED)
            q_dst = q_out_ptr + (tok[:, None] * stride_on + head[None, :] * stride_oh)[:, :, None] + d3
            tl.store(q_dst, y, mask=row_mask & (d3 < HEAD_DIM))
        else:
            kv_head = (group - num_q_groups) * KV_HEADS + tl.arange(0, KV_HEADS)
            kv_mask = (t_mask[:, None] & (kv_head < num_kv_heads)[None, :])[:, :, None]
            k_rows = k_ptr + (tok[:, None] * stride_kn + kv_head[None, :] * stride_kh)[:, :, None]
            k_y = _norm_rope_tile(k_rows, kv_mask, k_w_ptr, cos, sin, eps, HEAD_DIM, ROT_DIM, BLOCK_D,
                                HALF_ALIGN, ZERO_CENTERED)
            v_rows = v_ptr + (tok[:, None] * stride_vn + kv_head[None, :] * stride_vh)[:, :, None]
            keep = kv_mask & (d3 < HEAD_DIM)
            v = tl.load(v_rows + d3, mask=keep, other=0.0)
            slot = tl.load(slot_ptr + tok, mask=t_mask, other=-1).to(tl.int64)
            keep = keep & (slot >= 0)[:, None, None]
            kv_off = (slot[:, None] * stride_cs + kv_head[None, :] * stride_ch)[:, :, None] + d3
            tl.store(k_cache_ptr + kv_off, k_y.to(k_cache_ptr.dtype.element_ty), mask=keep)
            tl.store(v_cache_ptr + kv_off, v.to(v_cache_ptr.dtype.element_ty), mask=keep)


def fused_qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                             k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             zero_centered: bool = False, launch: QKRopeLaunch | None = None) -> torch.Tensor:
    """Normalise and rotate q and k, store k and v in the paged cache; returns q `[N, Hq, D]` (contiguous).

    q `[N, Hq, D]`, k and v `[N, Hk, D]`: any token and head strides, unit channel stride (views of
    the `qkv_proj` output). `q_weight`/`k_weight` `[D]`: the `q_norm`/`k_norm` weights (offsets from 1
    with `zero_centered`). `cos`/`sin` `[N, rotary_dim]` in q's dtype, `rotary_dim` even and
    <= D. Caches `[num_blocks, block_size, Hk, D]`; `slot_mapping [N]`: flat slot of each token's key
    and value, < 0 to skip. `launch` overrides `launch_config(N, Hq, Hk, D)` (tests, sweeps). Grid
    `(cdiv(N, block_t), cdiv(Hq, q_heads) + cdiv(Hk, kv_heads))`; no host synchronisation (CUDA-graph
    safe).
    """
    assert triton is not None, "triton is not installed"
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rot_dim = cos.shape[-1]
    assert k.shape == v.shape == (n, num_kv_heads, head_dim), (q.shape, k.shape, v.shape)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "channels must be contiguous"
    assert rot_dim % 2 == 0 and 0 < rot_dim <= head_dim and sin.shape == cos.shape == (n, rot_dim)
    assert cos.stride(1) == sin.stride(1) == 1 and q_weight.is_contiguous() and k_weight.is_contiguous()
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1 and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), \
        "cache blocks must be laid out slot after slot"
    assert slot_mapping.shape == (n,)
    cfg = launch or launch_config(n, num_q_heads, num_kv_heads, head_dim)
    assert all(x > 0 and x & (x - 1) == 0 for x in cfg[:3]), cfg
    q_out = torch.empty(n, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0:
        return q_out
    half = rot_dim // 2
    half_align = min(16, half & -half)  # largest power of two dividing rotary_dim / 2, capped
    num_q_groups = triton.cdiv(num_q_heads, cfg.q_heads)
    grid = (triton.cdiv(n, cfg.block_t), num_q_groups + triton.cdiv(num_kv_heads, cfg.kv_heads))
    _qk_norm_rope_store_kernel[grid](
        q, k, v, q_weight, k_weight, cos, sin, slot_mapping, q_out, k_cache, v_cache, eps, n, num_q_heads,
        num_kv_heads, num_q_groups,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, ROT_DIM=rot_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=cfg.block_t,
        Q_HEADS=cfg.q_heads, KV_HEADS=cfg.kv_heads, HALF_ALIGN=half_align, ZERO_CENTERED=zero_centered,
        num_warps=cfg.num_warps, **pdl_launch(q.device))
    return q_out
