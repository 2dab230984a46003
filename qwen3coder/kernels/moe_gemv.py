"""Decode-row MoE as two register-tile GEMVs: the down projection's weights are read during the gate/up.

At batch 1 the MoE reads the top-k experts' weights once (8 x 9.4 MB at the 30B-A3B shape) and does
almost no arithmetic, so what counts is how soon those reads start. The grouped GEMMs of
`kernels.fused_moe` start them after their programmatic-dependent-launch wait (`kernels.pdl`), each
kernel with its own ramp-up. Here, for 1..MAX_ROWS tokens:

* `_moe_gate_up_gemv_kernel`, grid (pairs, cdiv(I, BLOCK_N)): program (p, j) reads expert `topk_ids[p]`'s
  gate and up rows [j*BLOCK_N, (j+1)*BLOCK_N) over the whole hidden size into registers, the token's
  row of x, and writes `silu(x.gate) * (x.up)` (fp32 dots, one rounding) to `act[p]`. It *waits
  first*, then lets the next grid launch: the routing it reads is its predecessor's output.
* `_moe_down_gemv_kernel`, grid (pairs, cdiv(H, BLOCK_N)): program (p, j) reads `topk_ids[p]` and its
  expert's down rows [j*BLOCK_N, (j+1)*BLOCK_N) over the whole intermediate size *before* its own wait.
  That is safe because it launches only once every gate/up program has passed its wait, i.e. once
  the routing kernel has completed (the routing is read with `.cg`, from L2). Its resident programs
  therefore stream their down weights while the gate/up's last programs still run. After the wait:
  `act[p]`, the fp32 dot, times `topk_weights[p]`, one rounding, into `out[p]` ([N, K, H]: the
  partials that the next add+RMSNorm sums, as `fused_moe(reduce=False)` returns).

Rows of the weight tile are padded to a power of two along K (768 -> 1024 at the 30B-A3B
intermediate size; masked lanes read no memory). No alignment (`sorted_ids`) is needed: a program
finds its expert from `topk_ids` directly; a token's experts are distinct, so at batch 1 each expert
is read once (at batch > 1 an expert shared by two tokens is read twice, from L2 the second time).

Numerics: as the grouped GEMMs' (fp32 products and sums, SwiGLU in fp32, one rounding to act's dtype;
down: fp32 dot times the routing weight, one rounding), in another summation order. The plain-PyTorch
reference is `qwen3coder.models.layers.moe.moe_forward_reference`; `moe_gemv_reference` below does the
same arithmetic in torch for tests. `TUNED` lists the shapes and row counts measured faster than the
grouped GEMMs (`benchmarks/bench_decode_variants.py`): at the 30B-A3B MoE shape, batch 1 (~357 -> ~376
tok/s on an H200) and batch 2 (~514 -> ~535-553). `QWEN3CODER_MOE_GEMV=0` turns the path off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen3coder.kernels.gemv import GemvConfig
from qwen3coder.kernels.pdl import pdl_launch

try:
    import triton
    import triton.language as tl

    from qwen3coder.kernels.pdl import pdl_prologue
except ImportError:  # pragma: no cover - triton is optional on CPU
    triton = None

MAX_ROWS = 4
_HALF = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ENABLED = os.environ.get("QWEN3CODER_MOE_GEMV", "1") != "0"  # read once: hot path


@dataclass(frozen=True)
class MoEGemvConfig:
    """Tiles of the two kernels. `gate_up.w_tile` counts the gate and the up rows together:
    BLOCK_N = w_tile / (2 * padded H) for the gate/up, w_tile / padded I for the down projection."""
    gate_up: GemvConfig = GemvConfig(16384, 4)
    down: GemvConfig = GemvConfig(8192, 4)


# (token rows, hidden, intermediate) -> configuration, for the shapes measured faster here than on the
# grouped GEMMs (tests and benchmarks set their own). H200, 30B-A3B decode graphs, dummy weights
# (`benchmarks/bench_decode_variants.py`,
# benchmarks/results/decode_variants_30b-a3b-20261130T0951*-T1016*.json):
#   batch 1: one gate + one up row per program (2 warps), 4 down rows (4 warps): 375.9-377.7 tok/s in
#            three runs vs 340.5-358.0 for the grouped GEMMs; 2-row gate/up programs were even (361-364),
#            2-row down programs slower (337), 8 warps on 16-row gate/up slower (326)
#   batch 2: 2 gate + 2 up rows, 8 down rows (4 warps each): 535 / 553 vs 500-517
#   batch 4: no tile faster (690-748 vs 746-756), so not listed
TUNED: dict[tuple[int, int, int], MoEGemvConfig] = {
    (1, 2048, 768): MoEGemvConfig(GemvConfig(4096, 2), GemvConfig(4096, 4)),
    (2, 2048, 768): MoEGemvConfig(GemvConfig(8192, 4), GemvConfig(8192, 4)),
}


def set_moe_gemv_enabled(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = bool(enabled)


def moe_gemv_config(n_tokens: int, x: torch.Tensor, gate_up_proj: torch.Tensor) -> MoEGemvConfig | None:
    """The configuration when `fused_moe` should take these kernels for `n_tokens` rows of `x`, else
    None: the switch on, bf16/fp16 weights and activations, 1 <= rows <= MAX_ROWS, (rows, H, I) listed
    in `TUNED`, a CUDA device (or Triton's interpreter on the CPU)."""
    if not _ENABLED or triton is None or x.dtype not in _HALF or gate_up_proj.dtype != x.dtype:
        return None
    if not 1 <= n_tokens <= MAX_ROWS:
        return None
    if x.device.type != "cuda" and not (_INTERPRET and x.device.type == "cpu"):
        return None
    return TUNED.get((n_tokens, gate_up_proj.shape[2], gate_up_proj.shape[1] // 2))


def moe_gemv_reference(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in torch: partials [N, K, H] in x's dtype (fp32 dots, SwiGLU in fp32,
    act rounded once to x's dtype, fp32 down dot times the routing weight, rounded once)."""
    n, k = topk_ids.shape
    inter = gate_up_proj.shape[1] // 2
    ids = topk_ids.long()
    w13 = gate_up_proj[ids].float()  # [N, K, 2I, H]
    gu = torch.einsum("nkoh,nh->nko", w13, x.float())
    act = (F.silu(gu[..., :inter]) * gu[..., inter:]).to(x.dtype)
    down = torch.einsum("nkhi,nki->nkh", down_proj[ids].float(), act.float())
    return (down * topk_weights.float()[..., None]).to(x.dtype)


if triton is not None:

    @triton.jit
    def _moe_gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, inter, hidden, stride_xm, stride_we,
                                 stride_wn, stride_am, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """act[p, j] = silu(x[p // TOP_K] . W13[e, j]) * (x[p // TOP_K] . W13[e, inter + j]), e = ids[p]."""
        pdl_prologue(PDL)  # PDL 1 (wait first): the down kernel may read the routing before its wait
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rows < inter
        cols = tl.arange(0, BLOCK_K)
        k_mask = cols < hidden
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        base = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
        mask = n_mask[:, None] & k_mask[None, :]
        wg = tl.load(base, mask=mask, other=0.0)
        wu = tl.load(base + inter * stride_wn, mask=mask, other=0.0)
        x = tl.load(x_ptr + (pair // TOP_K) * stride_xm + cols, mask=k_mask, other=0.0).to(tl.float32)
        g = tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        u = tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + pair * stride_am + rows, act.to(act_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _moe_down_gemv_kernel(act_ptr, w_ptr, ids_ptr, wts_ptr, out_ptr, hidden, inter, stride_am, stride_we,
                              stride_wn, stride_om, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                              PDL: tl.constexpr):
        """out[p, n] = wts[p] * (act[p] . W2[ids[p], n]); the weights are loaded before the PDL wait."""
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rows < hidden
        cols = tl.arange(0, BLOCK_K)
        k_mask = cols < inter
        # the routing is complete once this grid runs (the gate/up kernel waited first): read it from L2
        expert = tl.load(ids_ptr + pair, cache_modifier=".cg").to(tl.int64)
        w = tl.load(w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        pdl_prologue(PDL)
        a = tl.load(act_ptr + pair * stride_am + cols, mask=k_mask, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        rw = tl.load(wts_ptr + pair).to(tl.float32)
        tl.store(out_ptr + pair * stride_om + rows, (acc * rw).to(out_ptr.dtype.element_ty), mask=n_mask)


def moe_gemv(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, config: MoEGemvConfig | None = None, reduce: bool = True) -> torch.Tensor:
    """Σ_k w_k · SwiGLU_{id_k}(x) for x [N, H], 1 <= N <= MAX_ROWS (weights as in `Experts`); `reduce=False`
    returns the weighted partials [N, K, H] (as `fused_moe`)."""
    assert triton is not None, "triton is not installed"
    n, k = topk_ids.shape
    assert x.dim() == 2 and x.shape[0] == n and 1 <= n <= MAX_ROWS, (tuple(x.shape), n)
    _, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    assert down_proj.shape[1:] == (hidden, inter) and gate_up_proj.stride(2) == 1 and down_proj.stride(2) == 1
    cfg = config or MoEGemvConfig()
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = topk_ids.contiguous().view(-1)  # before the launches: no copy kernel between the two
    wts = topk_weights.contiguous().view(-1)
    pairs = n * k
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    launch = pdl_launch(x.device)
    first = {**launch, "PDL": 1} if launch["PDL"] else launch  # wait first: see the module docstring
    bn = max(1, cfg.gate_up.block_n(hidden) // 2)  # gate and up rows share the tile
    _moe_gate_up_gemv_kernel[(pairs, triton.cdiv(inter, bn))](
        x, gate_up_proj, ids, act, inter, hidden, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1),
        act.stride(0), TOP_K=k, BLOCK_K=triton.next_power_of_2(hidden), BLOCK_N=bn,
        num_warps=cfg.gate_up.num_warps, **first)
    out = torch.empty(n, k, hidden, dtype=x.dtype, device=x.device)
    bn = cfg.down.block_n(inter)
    _moe_down_gemv_kernel[(pairs, triton.cdiv(hidden, bn))](
        act, down_proj, ids, wts, out, hidden, inter, act.stride(0),
        down_proj.stride(0), down_proj.stride(1), out.stride(1), BLOCK_K=triton.next_power_of_2(inter), BLOCK_N=bn,
        num_warps=cfg.down.num_warps, **launch)
    return out.sum(dim=1) if reduce else out
