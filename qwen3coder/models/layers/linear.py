"""`Linear`: nn.Linear whose decode-sized calls on the Triton path take the skinny GEMM kernel.

A drop-in subclass of `torch.nn.Linear` — same parameters (`weight [out, in]`, optional `bias`), so
state_dict keys, checkpoint names and the weight loader are unchanged. `forward` calls
`qwen3coder.kernels.skinny_gemm.skinny_linear` when the input is on the Triton path (`use_triton`:
CUDA, no autograd, kernels enabled) and `use_skinny` accepts the shape (bf16/fp16, at most
`SKINNY_MAX_M` rows, ...); everything else — prefill-sized batches, fp32, training, CPU — goes to
`F.linear` (cuBLAS on the GPU). `QWEN3CODER_SKINNY_GEMM=0` switches the skinny path off. Shapes
that `qwen3coder.kernels.gemv` lists (measured wins: today the attention output projection at batch 1)
take its register-tile GEMV first, whose weight reads start before the previous kernel ends.

Quantized weights never take the skinny path: the kernel reads `weight` as bf16/fp16 values, so a
weight stored in another dtype (FP8) or a module carrying scales (`weight_scale`,
`weight_scale_inv`) goes to `F.linear`. (Today's loader dequantizes FP8 checkpoints to the model
dtype at load time, so their linears hold plain bf16 weights and are eligible like any other.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.kernels import use_triton
from qwen3coder.models.layers.partials import SplitKPartials

_HALF = (torch.bfloat16, torch.float16)


def _half_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The tensor checks both decode kernels need: one half-precision dtype for x, weight and bias, a
    2-D weight with unit stride along K."""
    dtype = x.dtype
    if dtype not in _HALF or weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return False
    return x.dim() > 0 and weight.dim() == 2 and weight.stride(1) == 1


def skinny_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear(x, weight, bias)` may take the skinny kernel: `_half_operands` plus `use_skinny`'s
    shape policy."""
    if not _half_operands(x, weight, bias):
        return False
    from qwen3coder.kernels.skinny_gemm import use_skinny

    k = x.shape[-1]
    return use_skinny(x.numel() // max(1, k), weight.shape[0], k, x.dtype, x.device)


def gemv_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The `kernels.gemv` configuration when `linear(x, weight, bias)` (x on the Triton path) should
    take that kernel — `_half_operands`, 2-D x, and `gemv.gemv_config`'s shape policy — else None."""
    if x.dim() != 2 or not _half_operands(x, weight, bias):
        return None
    from qwen3coder.kernels.gemv import gemv_config as policy

    return policy(x.shape[0], weight.shape[0], x.shape[1], x.dtype, x.device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the register-tile GEMV or `skinny_linear` for decode-sized inputs on the
    Triton path."""
    if use_triton(x) and (cfg := gemv_config(x, weight, bias)) is not None:
        from qwen3coder.kernels.gemv import gemv

        return gemv(x, weight, bias, cfg)
    if use_triton(x) and skinny_eligible(x, weight, bias):
        from qwen3coder.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with the skinny-GEMM dispatch of `linear`; parameters and names as nn.Linear's.

    `fold_split_k` (set by a decoder layer where this layer's output goes only to the next
    `RMSNorm(hidden, residual)`, e.g. the attention output projection): when the skinny kernel splits
    K, `forward` returns the unreduced `SplitKPartials` and that norm's kernel sums them — one launch
    fewer per layer, same values (see `qwen3coder.models.layers.partials`)."""

    fold_split_k = False

    @property
    def quantized(self) -> bool:
        """Whether the layer carries FP8 scales (then only `F.linear` serves it)."""
        return getattr(self, "weight_scale_inv", None) is not None or getattr(self, "weight_scale", None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitKPartials:
        if self.quantized:
            return F.linear(x, self.weight, self.bias)  # a quantized layer: not for the bf16 kernel
        if self.fold_split_k and self.bias is None and x.dim() == 2 and use_triton(x) \
                and gemv_config(x, self.weight, None) is None and skinny_eligible(x, self.weight, None):
            from qwen3coder.kernels.skinny_gemm import skinny_linear

            y = skinny_linear(x, self.weight, None, reduce=False)
            return SplitKPartials(y, x.dtype) if y.dim() == 3 else y
        return linear(x, self.weight, self.bias)
