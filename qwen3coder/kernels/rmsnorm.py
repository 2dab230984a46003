"""Triton RMSNorm fused with the residual add (one row per program).

`fused_add_rmsnorm(x, residual, weight)` returns `(norm(x + residual), x + residual)` in one pass
over memory, with the same math as `qwen3coder.models.layers.norms.RMSNorm` (normalise in fp32;
standard: cast, then multiply by the weight; zero-centred: multiply by `1 + w` in fp32, then cast).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                            stride_x, stride_r, stride_o, stride_ro,
                            HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        normed = xf * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if ZERO_CENTERED:
            y = (normed * (1.0 + w.to(tl.float32))).to(out_ptr.dtype.element_ty)
        else:
            y = w * normed.to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      zero_centered: bool = False):
    """x [N, H] (+ residual) -> normed [N, H] (and the new residual when one was given)."""
    assert triton is not None, "triton is not installed"
    x2 = x.reshape(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    res2 = residual.reshape(-1, n_cols) if residual is not None else x2
    _add_rmsnorm_kernel[(n_rows,)](
        x2, res2, weight, out, res_out, n_cols, eps, x2.stride(0), res2.stride(0), out.stride(0),
        res_out.stride(0), HAS_RESIDUAL=residual is not None, ZERO_CENTERED=zero_centered,
        BLOCK=triton.next_power_of_2(n_cols))
    if residual is None:
        return out.view_as(x)
    return out.view_as(x), res_out.view_as(x)
