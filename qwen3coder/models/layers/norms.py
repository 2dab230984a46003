"""RMSNorm variants of the Qwen3 family, each matching transformers bit for bit in float32.

* `RMSNorm` — Qwen3 / Qwen3-MoE: normalise in fp32, cast back, multiply by `weight` (init 1).
* `RMSNorm(zero_centered=True)` — Qwen3-Next: the weight is stored as an offset (init 0) and the
  multiply by `1 + weight` happens in fp32 before the cast.
* `RMSNormGated` — the Gated DeltaNet output norm: normalise, scale, then multiply by `silu(z)`.

`forward(x, residual)` fuses the residual add of the pre-norm decoder (vLLM's pattern): it returns
`(norm(x + residual), x + residual)`; the sum is the same one transformers computes. `x` may be a
layer output left unsummed, `Partials` (Triton path only: a MoE layer's top-k expert outputs or the
attention output projection's split-K products, see `qwen3coder.models.layers.partials`): the fused
kernel then also sums the partials, so `x + residual` is `partials.reduce() + residual`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.kernels import use_triton
from qwen3coder.models.layers.partials import Partials


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor | Partials, residual: torch.Tensor | None = None):
        """norm(x), or (norm(x + residual), x + residual) when a residual is given. `Partials` (always
        with a residual) are summed first: in the kernel, or by `reduce()` off the Triton path."""
        if isinstance(x, Partials):
            assert residual is not None, "partials are only ever added to a residual"
            assert x.out_dtype == residual.dtype, (x.out_dtype, residual.dtype)
            x = x.partials if use_triton(x.partials) else x.reduce()  # [N, K, H]: the kernel sums them
        if use_triton(x):
            from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm

            return fused_add_rmsnorm(x, residual, self.weight, self.eps, self.zero_centered)
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x


class RMSNormGated(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        out = out * F.silu(gate.float())
        return out.to(dtype)
