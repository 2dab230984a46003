"""Triton attention prologue: per-head QK RMSNorm, RoPE and the paged KV-cache store in one launch.

`fused_qk_norm_rope_store(q, k, v, ...)` replaces, for a step that uses the KV cache, the unfused
sequence of `Qwen3Attention.forward` (q/k/v split copies, `q_norm`, `k_norm`, RoPE on q and on k,
`store_kv`): one program per (token, head) over the `Hq` query heads and then the `Hk` KV heads.
A query program normalises its head's row, rotates it and writes it to a contiguous `q [N, Hq, D]`;
a KV program does the same to the key row and writes it, with the value row unchanged, into the
paged cache at `slot_mapping[token]` (slots < 0 are skipped, as in `store_kv`).

The inputs may be strided views of the packed `qkv_proj` output — for Qwen3-Next's gated attention
`q` is the `[N, Hq, D]` view whose head stride is `2 * D` (query and gate interleaved per head).
The math repeats the reference's roundings step by step, so the result matches the unfused path:
RMSNorm in fp32 (`sum(x²) / D`, `rsqrt`, as `qwen3coder.kernels.rmsnorm`), then either
`w * x̂.to(dtype)` (Qwen3) or `(x̂ * (1 + w)).to(dtype)` (zero-centred, Qwen3-Next); RoPE in the
NeoX rotate-half layout on the first `rotary_dim` channels, each product and the sum rounded to the
activation dtype as the eager `x * cos + rotate_half(x) * sin` does. `cos`/`sin` are the step's
prepared rows `[N, rotary_dim]` (`RotaryEmbedding.step_cos_sin`); channels past `rotary_dim` pass
through. The rotate-half partner of channel `d` is loaded directly (`d ± rotary_dim/2`), so no
in-register shuffles are needed.
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
    def _norm_rope_row(row_ptr, w_ptr, cos_ptr, sin_ptr, eps, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, ZERO_CENTERED: tl.constexpr):
        """One head's row (unit channel stride at `row_ptr`) -> RMSNorm then RoPE, in the row's dtype."""
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        x = tl.load(row_ptr + d, mask=d_mask, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / HEAD_DIM + eps)
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        # rotate-half partner: d + R/2 in the first half (negated), d - R/2 in the second
        rot = d < ROT_DIM
        first = d < ROT_DIM // 2
        partner = tl.where(first, d + ROT_DIM // 2, d - ROT_DIM // 2)
        xp = tl.load(row_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            y = (xf * rstd * (1.0 + w)).to(x.dtype).to(tl.float32)
            yp = (xp * rstd * (1.0 + wp)).to(x.dtype).to(tl.float32)
        else:
            y = (w * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
            yp = (wp * (xp * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
        c = tl.load(cos_ptr + d, mask=rot, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + d, mask=rot, other=0.0).to(tl.float32)
        a = (y * c).to(x.dtype).to(tl.float32)
        b = (yp * s).to(x.dtype).to(tl.float32)
        roped = (a + tl.where(first, -b, b)).to(x.dtype)
        return tl.where(rot, roped, y.to(x.dtype))

    @triton.jit
    def _qk_norm_rope_store_kernel(q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr,
                                   q_out_ptr, k_cache_ptr, v_cache_ptr, eps, num_q_heads,
                                   stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                                   stride_cos, stride_sin, stride_on, stride_oh, stride_cs, stride_ch,
                                   HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                   ZERO_CENTERED: tl.constexpr):
        """Program (token, head): heads [0, Hq) are query heads, [Hq, Hq + Hk) KV heads."""
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        cos_row = cos_ptr + tok * stride_cos
        sin_row = sin_ptr + tok * stride_sin
        if head < num_q_heads:
            y = _norm_rope_row(q_ptr + tok * stride_qn + head * stride_qh, q_w_ptr, cos_row, sin_row, eps,
                               HEAD_DIM, ROT_DIM, BLOCK_D, ZERO_CENTERED)
            tl.store(q_out_ptr + tok * stride_on + head * stride_oh + d, y, mask=d_mask)
        else:
            kvh = head - num_q_heads
            y = _norm_rope_row(k_ptr + tok * stride_kn + kvh * stride_kh, k_w_ptr, cos_row, sin_row, eps,
                               HEAD_DIM, ROT_DIM, BLOCK_D, ZERO_CENTERED)
            v = tl.load(v_ptr + tok * stride_vn + kvh * stride_vh + d, mask=d_mask, other=0.0)
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            keep = d_mask & (slot >= 0)
            dst = slot * stride_cs + kvh * stride_ch + d
            tl.store(k_cache_ptr + dst, y.to(k_cache_ptr.dtype.element_ty), mask=keep)
            tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=keep)


def fused_qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                             k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             zero_centered: bool = False) -> torch.Tensor:
    """Normalise and rotate q and k, store k and v in the paged cache; returns q `[N, Hq, D]` (contiguous).

    q `[N, Hq, D]`, k and v `[N, Hk, D]`: any token and head strides, unit channel stride (views of
    the `qkv_proj` output). `q_weight`/`k_weight` `[D]`: the `q_norm`/`k_norm` weights (offsets from 1
    with `zero_centered`). `cos`/`sin` `[N, rotary_dim]` in q's dtype, `rotary_dim` even and
    <= D. Caches `[num_blocks, block_size, Hk, D]`; `slot_mapping [N]`: flat slot of each token's key
    and value, < 0 to skip. Launch: grid `(N, Hq + Hk)`; no host synchronisation (CUDA-graph safe).
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
    q_out = torch.empty(n, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0:
        return q_out
    _qk_norm_rope_store_kernel[(n, num_q_heads + num_kv_heads)](
        q, k, v, q_weight, k_weight, cos, sin, slot_mapping, q_out, k_cache, v_cache, eps, num_q_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, ROT_DIM=rot_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        ZERO_CENTERED=zero_centered)
    return q_out
