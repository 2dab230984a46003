"""Register-tile GEMV for decode rows, optionally with the add+RMSNorm of its input fused in front.

At batch-1 decode a Qwen3-MoE layer enters attention through two dependent launches: the input
add+RMSNorm (which also sums the previous MoE layer's top-k partials into the residual) and the qkv
projection (2048 -> 5120: 21 MB of weight). `norm_gemv` does both in one launch, and starts the weight
stream before the previous kernel has finished:

* Grid `cdiv(N, BLOCK_N)`: a program owns BLOCK_N rows of `W [N, K]` — the whole K, so its tile
  (`W_TILE` elements, e.g. 8 x 2048) sits in registers. It loads the tile first: weights, which no
  kernel writes, may be read before the programmatic-dependent-launch wait (`kernels.pdl`), so the
  weight reads of every resident program overlap the tail of the kernel before.
* Then, for each of the M <= MAX_ROWS input rows in turn: the row — with a norm, the add+RMSNorm of
  `rmsnorm.add_rmsnorm_row` (the norm kernel's own code: partials summed in fp32 and rounded once,
  residual added, normalised, scaled, rounded to the activation dtype); program 0 stores the new
  residual row — then the fp32 dot products of the row with the tile's BLOCK_N weight rows, the bias
  added in fp32, one rounding to the output dtype.

Without a norm it is a plain GEMV with the same weight prefetch (`gemv`), e.g. for the attention
output projection.

Numerics. The products are exact in fp32 and summed in fp32 (Triton's reduction tree over K), then
rounded once: the result agrees with `F.linear` / cuBLAS on the same normed input up to the order of
the fp32 sums, i.e. one ulp of the output dtype where the value sits next to a rounding boundary (the
skinny GEMM's argument, `kernels.skinny_gemm`). The new residual is bitwise the norm kernel's; the
normed row may differ from it by one ulp where the variance's fp32 sum, reduced in this kernel's
layout, rounds differently (tests/test_kernel_norm_gemv.py measures both against the unfused kernels).

Dispatch (`gemv_config`): host-only and deterministic; a shape takes this kernel only where `TUNED`
lists it (H200 measurements), at most MAX_ROWS rows; `QWEN3CODER_NORM_GEMV=0` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
    from qwen3coder.kernels.rmsnorm import add_rmsnorm_row
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

MAX_ROWS = 4  # rows are processed one after another in every program: latency grows with M
_HALF = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ENABLED = os.environ.get("QWEN3CODER_NORM_GEMV", "1") != "0"  # read once: hot path


@dataclass(frozen=True)
class GemvConfig:
    """A program holds `w_tile` weight elements (BLOCK_N = w_tile / padded K rows) with `num_warps` warps."""
    w_tile: int = 16384
    num_warps: int = 8

    def block_n(self, k: int) -> int:
        return max(1, self.w_tile // triton.next_power_of_2(k))


# (N, K) -> configuration for rows <= MAX_ROWS; shapes not listed keep their usual path.
# Empty until measured (benchmarks/bench_decode_variants.py).
TUNED: dict[tuple[int, int], GemvConfig] = {}
DEFAULT = GemvConfig()


def set_gemv_enabled(enabled: bool) -> None:
    """Switch the kernel on or off for the whole process (benchmarks compare the two)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemvConfig | None:
    """The launch configuration when x [m, k] · W [n, k]^T should take this kernel, else None: the switch
    on, bf16/fp16, 1 <= m <= MAX_ROWS, K a multiple of 16, a CUDA device (or Triton's interpreter) and
    `TUNED` listing (n, k) (tests list their own shapes)."""
    if not _ENABLED or triton is None or dtype not in _HALF:
        return None
    if not (1 <= m <= MAX_ROWS and n >= 1 and k >= 16 and k % 16 == 0):
        return None
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        return None
    return TUNED.get((n, k))


def norm_gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch GEMV: fp32 products and sums, bias added in fp32, one rounding to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _norm_gemv_kernel(x_ptr, res_ptr, norm_w_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, M, N, K, eps,
                          stride_x, stride_xk, stride_r, stride_w, stride_o, NORM: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr, NUM_PARTIALS: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                          PDL: tl.constexpr):
        """Program p: output columns [p*BLOCK_N, (p+1)*BLOCK_N) of every row; see the module docstring."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_K)
        k_mask = cols < K
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w + cols[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # weights: before the wait
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        pdl_prologue(PDL)
        for row in range(0, M):  # M <= MAX_ROWS rows of K: int32 offsets
            if NORM:
                y, x = add_rmsnorm_row(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, row, cols, k_mask, K, eps,
                                       stride_x, stride_xk, stride_r, HAS_RESIDUAL, ZERO_CENTERED, NUM_PARTIALS,
                                       BLOCK_K)
                if HAS_RESIDUAL and pid == 0:
                    tl.store(res_out_ptr + row * K + cols, x, mask=k_mask)
            else:
                y = tl.load(x_ptr + row * stride_x + cols, mask=k_mask, other=0.0)
            acc = tl.sum(w.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)  # [BLOCK_N] fp32
            if HAS_BIAS:
                acc += bias
            tl.store(out_ptr + row * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _launch(x2, stride_xk, num_partials, residual, norm_weight, eps, zero_centered, weight, bias, cfg, norm):
    m, k = residual.shape if residual is not None else (x2.shape[0], x2.shape[-1])
    n = weight.shape[0]
    dtype = residual.dtype if residual is not None else x2.dtype
    out = torch.empty(m, n, dtype=dtype, device=weight.device)
    res_out = torch.empty(m, k, dtype=dtype, device=weight.device) if residual is not None else out
    block_k = triton.next_power_of_2(k)
    block_n = cfg.block_n(k)
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, residual if residual is not None else x2, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, res_out, m, n, k, eps, x2.stride(0), stride_xk,
        residual.stride(0) if residual is not None else 0, weight.stride(0), out.stride(0), NORM=norm,
        HAS_RESIDUAL=residual is not None, ZERO_CENTERED=zero_centered, NUM_PARTIALS=num_partials,
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=cfg.num_warps,
        **pdl_launch(weight.device))
    return out, res_out


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              zero_centered: bool, weight: torch.Tensor, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(linear(normed, weight, bias), new_residual)` where `(normed, new_residual)` is
    `fused_add_rmsnorm(x, residual, norm_weight, eps, zero_centered)` — x [M, K] (+ residual [M, K]), or
    unsummed partials [M, P, K] with residual [M, K]; without a residual, `(linear(norm(x)), None)`.
    M <= MAX_ROWS; weight [N, K] with unit stride along K, in the activation dtype."""
    assert triton is not None, "triton is not installed"
    if residual is not None and x.dim() == 3:
        assert x.shape[0] == residual.shape[0] and x.shape[2] == residual.shape[1] and x.stride(2) == 1, \
            (x.shape, residual.shape)
        num_partials, stride_xk = x.shape[1], x.stride(1)
    else:
        assert x.dim() == 2 and (residual is None or x.shape == residual.shape), (x.shape, residual)
        x = x.contiguous()
        num_partials, stride_xk = 0, 0
    if residual is not None:
        residual = residual.contiguous()
    m, k = x.shape[0], x.shape[-1]
    assert 1 <= m <= MAX_ROWS, f"norm_gemv takes 1..{MAX_ROWS} rows, got {m}"
    assert weight.shape[1] == k and weight.stride(1) == 1, (weight.shape, k)
    assert weight.dtype == (residual.dtype if residual is not None else x.dtype), (weight.dtype, x.dtype)
    assert norm_weight.shape == (k,), norm_weight.shape
    out, res_out = _launch(x, stride_xk, num_partials, residual, norm_weight, eps, zero_centered, weight, bias,
                           config or DEFAULT, True)
    return out, (res_out if residual is not None else None)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] · weight [N, K]^T (+ bias) -> [M, N] in x's dtype, M <= MAX_ROWS (no norm)."""
    assert triton is not None, "triton is not installed"
    assert x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS, x.shape
    assert weight.shape[1] == x.shape[1] and weight.stride(1) == 1 and weight.dtype == x.dtype, (weight.shape, x.shape)
    x = x.contiguous()
    out, _ = _launch(x, 0, 0, None, None, 0.0, False, weight, bias, config or DEFAULT, False)
    return out
