"""Triton RMSNorm fused with the residual add (one row per program).

`fused_add_rmsnorm(x, residual, weight)` returns `(norm(x + residual), x + residual)` in one pass
over memory, with the same math as `qwen3coder.models.layers.norms.RMSNorm` (normalise in fp32;
standard: cast, then multiply by the weight; zero-centred: multiply by `1 + w` in fp32, then cast).

`x` may also be unsummed partials `[N, K, H]` with `residual [N, H]` — the top-k expert outputs of a
MoE layer (`fused_moe(reduce=False)`, in the activation dtype) or the fp32 split-K products of a skinny
GEMM (`skinny_linear(reduce=False)`): the kernel first sums the K partials in fp32, in order, and
rounds the sum once to the residual's dtype — what the layer's own reduction gives — then adds the
residual and normalises as above. That folds those sums into the next norm instead of a reduction
kernel of their own (`qwen3coder.models.layers.partials`).

The residual add and the weight multiply compute in fp32 and round to the activation dtype, as torch
does for bf16 / fp16 tensors. fp32 carries at least 2p + 2 significand bits of bf16 (p = 8) and fp16
(p = 11), so that gives the same values as native half-precision adds and multiplies (one rounding
of the exact result); computing through fp32 also lets Triton's CPU interpreter, which has no bf16
arithmetic, run the kernel in bf16.
"""

from __future__ import annotations

import torch

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def add_rmsnorm_row(x_ptr, res_ptr, w_ptr, out_ptr, row, cols, mask, n_cols, eps, stride_x, stride_xk,
                        stride_r, HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                        NUM_PARTIALS: tl.constexpr, BLOCK: tl.constexpr):
        """One row `row` (int64): -> (normed row, new residual row), both in `out_ptr`'s dtype (the
        residual row is x itself without HAS_RESIDUAL; nothing is stored). Shared with
        `kernels.norm_router`."""
        OUT_DTYPE = out_ptr.dtype.element_ty
        if NUM_PARTIALS > 0:
            acc = tl.zeros((BLOCK,), tl.float32)
            for k in tl.static_range(NUM_PARTIALS):
                acc += tl.load(x_ptr + row * stride_x + k * stride_xk + cols, mask=mask, other=0.0).to(tl.float32)
            x = acc.to(OUT_DTYPE)  # one rounding of the fp32 sum (partials may be fp32)
        else:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(OUT_DTYPE)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        normed = xf * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            y = normed * (1.0 + w)
        else:
            y = w * normed.to(x.dtype).to(tl.float32)  # cast, then scale (exact product, one rounding)
        return y.to(OUT_DTYPE), x

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                            stride_x, stride_xk, stride_r, stride_o, stride_ro,
                            HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                            NUM_PARTIALS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """NUM_PARTIALS 0: x is one row [H] per program; K > 0: K partial rows, `stride_xk` apart."""
        pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y, x = add_rmsnorm_row(x_ptr, res_ptr, w_ptr, out_ptr, row, cols, mask, n_cols, eps, stride_x, stride_xk,
                               stride_r, HAS_RESIDUAL, ZERO_CENTERED, NUM_PARTIALS, BLOCK)
        if HAS_RESIDUAL:
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      zero_centered: bool = False):
    """x [..., H] (+ residual, same shape) -> normed (and the new residual when one was given).

    Partials: x [N, K, H] with residual [N, H] (one dimension fewer) -> (normed [N, H], new
    residual [N, H]) in the residual's dtype, where the new residual is the sum of x over K (fp32
    accumulation in order, rounded once) + residual. Partials always come with a residual.
    """
    assert triton is not None, "triton is not installed"
    n_cols = x.shape[-1]
    num_partials = 0
    if residual is not None and x.dim() == residual.dim() + 1:
        assert x.dim() == 3 and residual.shape == (x.shape[0], n_cols), (x.shape, residual.shape)
        num_partials = x.shape[1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        x2, stride_xk = x, x.stride(1)
    else:
        x2, stride_xk = x.reshape(-1, n_cols), 0
    shape = residual.shape if num_partials else x.shape
    n_rows = x2.shape[0]
    out = torch.empty(n_rows, n_cols, dtype=residual.dtype if num_partials else x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    res2 = residual.reshape(-1, n_cols) if residual is not None else out
    _add_rmsnorm_kernel[(n_rows,)](
        x2, res2, weight, out, res_out, n_cols, eps, x2.stride(0), stride_xk, res2.stride(0), out.stride(0),
        res_out.stride(0), HAS_RESIDUAL=residual is not None, ZERO_CENTERED=zero_centered,
        NUM_PARTIALS=num_partials, BLOCK=triton.next_power_of_2(n_cols),
        **pdl_launch(x.device))
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)
