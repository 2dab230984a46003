"""Triton skinny GEMM `y = x W^T (+ b)` for a few rows of x: the dense linears of decode steps.

At decode a linear layer reads its whole weight `W [N, K]` (nn.Linear's row-major layout) for 1..64
rows of `x [M, K]`: the time is the weight's bytes over the memory bandwidth. The kernel streams W once:

* Grid `(cdiv(N, BLOCK_N), S)`: a program owns BLOCK_N rows of W (output columns) and one of S
  ranges of whole K blocks (split-K; S = 1 for all but small N such as the MoE router's N = 128).
* Two inner products, picked by the launch configuration: `dot` (`tl.dot` on tensor cores with the
  operands swapped — `W_tile [BLOCK_N, BLOCK_K] · x_tile^T [BLOCK_K, BLOCK_M]` — so that the weight
  tile is the MMA's wide side and the x rows, padded to BLOCK_M >= 16, the narrow one; software
  pipelined over K by `num_stages`) and `fma` (broadcast multiply-add into a
  `[BLOCK_N, BLOCK_M, BLOCK_K]` fp32 accumulator, reduced over K once after the loop; BLOCK_M = the
  rows rounded up to a power of two; the benchmark tries it for M <= FMA_MAX_M).
* fp32 accumulation; with S = 1 the bias is added in fp32 and the result rounded once to x's dtype.
  With S > 1 each split writes fp32 partials `[S, M, N]` and a second kernel sums them in split order
  (fixed: no atomics, so outputs are deterministic run to run), adds the bias and rounds once.

Launch decisions are host-only and deterministic (no autotuning, CUDA-graph friendly): `skinny_config`
looks the shape up in `TUNED` (entries printed by `benchmarks/bench_skinny_gemm.py`, from an H200
sweep at the 30B-A3B shapes), else applies `default_config`'s rule; on a GPU `use_skinny` takes only
the shapes `TUNED` lists as wins over cuBLAS. Each output row is computed
independently of the other rows, and the configuration depends on the rows only through their
power-of-two bucket, so a CUDA graph padded to its bucket gives the same rows as an eager call.
`use_skinny` is the dispatch policy of `qwen3coder.models.layers.linear`;
`QWEN3CODER_SKINNY_GEMM=0` (or `set_skinny_enabled(False)`) turns the kernel off everywhere.

Numerics vs `skinny_linear_reference` and cuBLAS (`F.linear`): all three multiply bf16/fp16 inputs
exactly in fp32 and accumulate in fp32; they differ only in summation order (cuBLAS tiles and splits
K its own way; this kernel adds K blocks in order inside each split, then the splits in order). Each
fp32 sum is within `K · 2^-24 · Σ_k |x_k w_k|` of the exact value (typically ~√K · 2^-24 of
Σ|x w|), far below a bf16 half-ulp (2^-9 relative) unless the output cancels to much less than
Σ|x w|. After the single rounding the outputs therefore agree exactly except where the fp32 value
sits next to a rounding boundary, where they differ by one ulp of the output dtype (and, for outputs
that cancel, by at most the fp32 sums' disagreement). fp32 inputs (tests only; `use_skinny` does
not pick fp32) use IEEE dots, so they are not rounded to tf32. (PyTorch's default
`torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction = True` lets cuBLAS keep
split-K partials in the half dtype, i.e. round more than once; this kernel's partials stay fp32.)
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
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

SKINNY_MAX_M = 64  # rows up to which `use_skinny` takes the kernel (on CUDA: the shapes `TUNED` lists)
INTERPRET_MAX_M = 16  # ... and under Triton's interpreter (CPU tests), where untuned shapes take it too
FMA_MAX_M = 4  # the benchmark tries the broadcast-FMA inner product up to this many rows (3-D accumulator)
TARGET_PROGRAMS = 256  # BLOCK_N shrinks (down to its minimum) until the grid has this many tiles ...
MIN_PROGRAMS = 128  # ... and split-K doubles while fewer programs than this (~ one per SM of an H200)
_REDUCE_BLOCK = 1024  # output columns per program of the split-K reduction
_HALF = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run through Triton's interpreter
_ENABLED = os.environ.get("QWEN3CODER_SKINNY_GEMM", "1") != "0"  # read once: hot path


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch configuration. BLOCK_M follows from the rows (`block_m`); `split_k` is an upper bound
    (`skinny_linear` never launches splits without a K block)."""
    block_n: int = 16
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    dot: bool = True

    def block_m(self, m: int) -> int:
        """Rows of the x tile: a power of two >= m, and >= 16 for `tl.dot`."""
        p = row_bucket(m)
        return max(16, p) if self.dot else p


# (rows rounded up to a power of two, N, K) -> configuration, or None where cuBLAS is faster
# (`use_skinny` then declines). Set from benchmarks/bench_skinny_gemm.py, which prints these entries.
# Empty until the first H200 sweep: every shape takes `default_config`.
def _tuned_30b_a3b() -> dict[tuple[int, int, int], SkinnyConfig | None]:
    """`benchmarks/bench_skinny_gemm.py` on an H200 (2026-11-30, weights cycled past L2, CUDA graphs;
    benchmarks/results/skinny_gemm_30b-a3b-20261130T062751.json), µs per call, cuBLAS -> this kernel:
      qkv 2048->5120   8.0 -> 8.1 (cuBLAS kept)      o_proj 4096->2048  9.4 -> 8.35 (split-K 4)
      router 2048->128 5.3 -> 3.9 (FMA, 1-2 rows)   lm_head 2048->151936  150 -> 141
    and for 32 / 64 rows (skinny_gemm_30b-a3b-20261130T141437.json): o_proj 9.0 / 10.1 -> 7.4 / 8.0 (cuBLAS's
    split-K takes a second kernel), router 5.7 / 5.6 -> 3.6 / 3.8; qkv 8.3 -> 8.4 / 8.9 (cuBLAS kept)."""
    dot = dict(block_k=128, num_warps=4, num_stages=4, dot=True)
    table: dict[tuple[int, int, int], SkinnyConfig | None] = {}
    for rows in (1, 2, 4, 8, 16):
        table[(rows, 5120, 2048)] = None
        table[(rows, 2048, 4096)] = SkinnyConfig(block_n=64, split_k=4, **dot)
        table[(rows, 151936, 2048)] = SkinnyConfig(block_n=64, split_k=1, **dot)
        table[(rows, 128, 2048)] = (
            SkinnyConfig(block_n=4, block_k=512, split_k=1, num_warps=4, num_stages=1, dot=False) if rows <= 2
            else SkinnyConfig(block_n=64 if rows == 4 else 16, split_k=8, **dot))
    for rows in (32, 64):  # the LM head was not swept at these rows: cuBLAS
        table[(rows, 5120, 2048)] = None
        table[(rows, 2048, 4096)] = SkinnyConfig(block_n=64, split_k=4, **dot)
    table[(32, 128, 2048)] = SkinnyConfig(block_n=64, block_k=256, split_k=4, num_warps=4, num_stages=3, dot=True)
    table[(64, 128, 2048)] = SkinnyConfig(block_n=64, split_k=8, **dot)
    return table


# (rows bucket, N, K) -> configuration, or None where cuBLAS was measured faster. On a GPU only the
# shapes listed here take the kernel (the default rule lost to cuBLAS on the 30B-A3B's qkv / o_proj
# shapes); the default rule serves the CPU interpreter (tests) and the benchmark's "current" column.
TUNED: dict[tuple[int, int, int], SkinnyConfig | None] = _tuned_30b_a3b()


def set_skinny_enabled(enabled: bool) -> None:
    """Switch the skinny path on or off for the whole process (benchmarks compare the two)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def row_bucket(m: int) -> int:
    """m rounded up to a power of two: the row key of `TUNED`."""
    return 1 << max(0, m - 1).bit_length()


def default_split(n: int, k: int, block_n: int, block_k: int) -> int:
    """Split-K count of the default rule: doubled while the grid has fewer than `MIN_PROGRAMS`
    programs and each split keeps at least two K blocks."""
    tiles, k_blocks, split = triton.cdiv(n, block_n), triton.cdiv(k, block_k), 1
    while tiles * split < MIN_PROGRAMS and k_blocks >= 4 * split:
        split *= 2
    return split


def default_config(m: int, n: int, k: int) -> SkinnyConfig:
    """The rule for shapes not in `TUNED` (the same for every m; BLOCK_M follows from m): tensor-core
    dot, 128-wide K steps, 4 stages, 4 warps; the widest BLOCK_N of 64/32 giving `TARGET_PROGRAMS`
    column tiles, else 16; split-K by `default_split`."""
    block_k = 128
    block_n = 16
    for bn in (64, 32):
        if triton.cdiv(n, bn) >= TARGET_PROGRAMS:
            block_n = bn
            break
    return SkinnyConfig(block_n=block_n, block_k=block_k, split_k=default_split(n, k, block_n, block_k))


def skinny_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Launch configuration for x [m, k] · W [n, k]^T: `TUNED`, else `default_config`."""
    tuned = TUNED.get((row_bucket(m), n, k))
    return tuned if tuned is not None else default_config(m, n, k)


def use_skinny(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether x [m, k] · W [n, k]^T in `dtype` on `device` should take `skinny_linear`: the switch is
    on, bf16/fp16, 1 <= m <= SKINNY_MAX_M, K a multiple of 16 (16-byte aligned rows), a CUDA device
    (or Triton's interpreter, up to INTERPRET_MAX_M rows), and on CUDA a `TUNED` entry that beat
    cuBLAS (the interpreter also takes untuned shapes, so the tests exercise the default rule). The
    caller checks the tensors themselves (same dtype, unit stride along K, no FP8 scales)."""
    if not _ENABLED or triton is None or dtype not in _HALF:
        return False
    if not (1 <= m <= SKINNY_MAX_M and n >= 1 and k >= 16 and k % 16 == 0):
        return False
    if device.type != "cuda" and not _INTERPRET:
        return False
    key = (row_bucket(m), n, k)
    if device.type == "cuda":
        return TUNED.get(key) is not None  # measured wins only
    return m <= INTERPRET_MAX_M and (key not in TUNED or TUNED[key] is not None)


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Plain-PyTorch reference: fp32 products and sums, bias added in fp32, one rounding to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, k_per_split,
                            stride_xm, stride_wn, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        """One (BLOCK_N columns, K split): acc [BLOCK_N, BLOCK_M] = W_tile · x^T over the split's K
        range. SPLIT: fp32 partials to part[split, m, n]; else bias, round, store out[m, n]."""
        pdl_prologue(PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
        if DOT:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K), tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            if EVEN_K:
                xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k < k_end
                xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT:
                if IEEE:
                    acc += tl.dot(wt, tl.trans(xt), input_precision="ieee")
                else:
                    acc += tl.dot(wt, tl.trans(xt))
            else:
                acc3 += wt.to(tl.float32)[:, None, :] * xt.to(tl.float32)[None, :, :]
        if not DOT:
            acc = tl.sum(acc3, axis=2)
        mask = n_mask[:, None] & m_mask[None, :]
        if SPLIT:
            part = part_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
            tl.store(part, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            out = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "num_splits"])
    def _skinny_gemm_reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, num_splits, stride_om,
                                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One (row, BLOCK columns): sum the splits' fp32 partials in split order, add the bias,
        round once."""
        pdl_prologue(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, num_splits):
            acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_layout(k: int, cfg: SkinnyConfig) -> tuple[int, int]:
    """(splits, K per split) for `cfg.split_k` requested splits: whole K blocks per split, as even as
    possible, at most one split per K block, and no empty split (the last one may be shorter)."""
    k_blocks = triton.cdiv(k, cfg.block_k)
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(cfg.split_k, k_blocks)))
    return triton.cdiv(k_blocks, blocks_per_split), blocks_per_split * cfg.block_k


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, reduce: bool = True) -> torch.Tensor:
    """x [..., K] · weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype (fp32 accumulation, one
    rounding). Meant for few rows (decode); any row count works. `config` overrides `skinny_config`
    (the benchmark's sweep). weight must have unit stride along K; x is made so if needed.

    `reduce=False` (2-D x, no bias): where the launch splits K, return the fp32 split partials
    `[M, S, N]` (a view of the `[S, M, N]` buffer) instead of reducing them — their sum in split order,
    rounded once to x's dtype, is the result (`kernels.rmsnorm.fused_add_rmsnorm` does that sum as it
    adds the residual); without a split the result itself `[M, N]` comes back."""
    assert triton is not None, "triton is not installed"
    *lead, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1, "weight must be [N, K] with unit stride along K"
    assert x.dtype == weight.dtype, f"x is {x.dtype}, weight {weight.dtype}"
    assert bias is None or bias.shape == (n,)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if k == 0:
        out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
        return out.view(*lead, n)
    cfg = config if config is not None else skinny_config(m, n, k)
    splits, k_per_split = split_layout(k, cfg)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    b = bias if bias is not None else out  # unused pointer when no bias
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x2, weight, b, out, part, m, n, k, k_per_split, x2.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT=cfg.dot, SPLIT=splits > 1,
        EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x.device))
    if splits > 1 and not reduce:
        assert bias is None and not lead[1:], "unreduced partials: 2-D x and no bias"
        return part.permute(1, 0, 2)
    if splits > 1:
        block = min(_REDUCE_BLOCK, triton.next_power_of_2(n))
        _skinny_gemm_reduce_kernel[(m, triton.cdiv(n, block))](
            part, b, out, m, n, splits, out.stride(0), HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
            **pdl_launch(x.device))
    return out.view(*lead, n)
