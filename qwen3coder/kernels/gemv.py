"""Register-tile GEMV for a decode row: the weight read starts before the previous kernel ends.

`y = x W^T (+ b)` for 1..MAX_ROWS rows of x, where a program's share of `W [N, K]` fits in registers:

* Grid `cdiv(N, BLOCK_N)`: a program owns BLOCK_N rows of W over the whole K, a `[BLOCK_N, K]` tile
  of `w_tile` elements (e.g. 2 x 4096). It loads the tile first: weights, which no kernel writes, may
  be read before the programmatic-dependent-launch wait (`kernels.pdl`), so the weight reads of every
  resident program overlap the tail of the kernel before (the skinny GEMM, `kernels.skinny_gemm`,
  streams K in a pipelined loop after the wait instead).
* After the wait, for each row in turn: the row of x, fp32 products with the tile, summed over K in
  fp32, the bias added in fp32, one rounding to x's dtype. No split-K, no second kernel.

Measured (H200, 30B-A3B decode graphs, `benchmarks/bench_decode_variants.py`,
benchmarks/results/decode_variants_30b-a3b-20261130T084348.json, tok/s at batch 1 / 2 / 4): the
attention output projection (4096 -> 2048) at batch 1 went from 333 to 343 (8192-element tiles, 4
warps) against the skinny split-K GEMM with its sum folded into the next norm; at batch 2 it was even
(503 vs 505) and at batch 4 slower (726 vs 743): every program walks the rows one after another. The
qkv projection (2048 -> 5120, with the input add+RMSNorm fused in front) lost to cuBLAS at every
tile tried (batch 1: 303-329 vs 333), so `TUNED` lists the batch-1 o_proj shape only.

Numerics: as the skinny GEMM's (fp32 products exact, fp32 sums in another order than cuBLAS's, one
rounding): one ulp of the output dtype from `F.linear` where a value sits next to a rounding boundary.
Each row is computed independently of the others; the summation order is fixed, so results are the
same run to run, eager or in a CUDA graph. `QWEN3CODER_GEMV=0` turns the kernel off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qwen3coder.kernels.pdl import pdl_launch
# the plain-PyTorch reference (fp32 products and sums, bias in fp32, one rounding) and the rows key are
# the skinny GEMM's
from qwen3coder.kernels.skinny_gemm import row_bucket
from qwen3coder.kernels.skinny_gemm import skinny_linear_reference as gemv_reference  # noqa: F401

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

MAX_ROWS = 4  # rows are processed one after another in every program: latency grows with M
_HALF = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ENABLED = os.environ.get("QWEN3CODER_GEMV", "1") != "0"  # read once: hot path


@dataclass(frozen=True)
class GemvConfig:
    """A program holds `w_tile` weight elements (BLOCK_N = w_tile / padded K rows) with `num_warps` warps."""
    w_tile: int = 8192
    num_warps: int = 4

    def block_n(self, k: int) -> int:
        return max(1, self.w_tile // triton.next_power_of_2(k))


# (rows bucket, N, K) -> configuration: the shapes measured faster here than on their usual path
# (the module docstring); others keep theirs. Tests list their own shapes.
TUNED: dict[tuple[int, int, int], GemvConfig] = {(1, 2048, 4096): GemvConfig(8192, 4)}


def set_gemv_enabled(enabled: bool) -> None:
    """Switch the kernel on or off for the whole process (benchmarks compare the two)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemvConfig | None:
    """The launch configuration when x [m, k] · W [n, k]^T should take this kernel, else None: the switch
    on, bf16/fp16, 1 <= m <= MAX_ROWS, K a multiple of 16, a CUDA device (or Triton's interpreter on the
    CPU) and `TUNED` listing (rows bucket, n, k)."""
    if not _ENABLED or triton is None or dtype not in _HALF:
        return None
    if not (1 <= m <= MAX_ROWS and n >= 1 and k >= 16 and k % 16 == 0):
        return None
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        return None
    return TUNED.get((row_bucket(m), n, k))


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
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
            x = tl.load(x_ptr + row * stride_x + cols, mask=k_mask, other=0.0)
            acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N] fp32
            if HAS_BIAS:
                acc += bias
            tl.store(out_ptr + row * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] · weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, 1 <= M <= MAX_ROWS; weight
    with unit stride along K, in x's dtype. `config` overrides the default tile."""
    assert triton is not None, "triton is not installed"
    assert x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS, f"gemv takes 1..{MAX_ROWS} rows, got {tuple(x.shape)}"
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1 and weight.dtype == x.dtype, (weight.shape, x.shape)
    assert bias is None or (bias.shape == (n,) and bias.dtype == x.dtype)
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = config or GemvConfig()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = cfg.block_n(k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_K=triton.next_power_of_2(k), BLOCK_N=block_n, num_warps=cfg.num_warps,
        **pdl_launch(x.device))
    return out
