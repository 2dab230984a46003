"""`Partials`: a layer output left unsummed, for the next fused add+RMSNorm kernel to sum.

On the Triton path two decode-step reductions need no launch of their own: the MoE layer's sum over
its top-k expert outputs (`TopKPartials`, see `qwen3coder.models.layers.moe`) and the split-K sum of
the skinny GEMM of the attention output projection (`SplitKPartials`, see
`qwen3coder.models.layers.linear`). Both feed only the next `RMSNorm(hidden, residual)`, whose kernel
(`qwen3coder.kernels.rmsnorm.fused_add_rmsnorm`) sums the partials in fp32, in order, rounds once to
the activation dtype and goes on exactly as for a summed input. A distinct type rather than a bare
3-D tensor, so that it cannot be mistaken for hidden states: anything other than that norm must call
`reduce()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Partials:
    """`partials [N, K, H]` (any strides, unit stride along H) whose sum over K, accumulated in fp32 and
    rounded once to `dtype` (default: the partials' dtype), is the layer's output [N, H]."""

    partials: torch.Tensor
    dtype: torch.dtype | None = None

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype if self.dtype is not None else self.partials.dtype

    def reduce(self) -> torch.Tensor:
        """The [N, H] sum: fp32 accumulation over K in order, one rounding to `out_dtype`."""
        acc = self.partials[:, 0].float()
        for k in range(1, self.partials.shape[1]):
            acc = acc + self.partials[:, k].float()
        return acc.to(self.out_dtype)


class TopKPartials(Partials):
    """A MoE layer's weighted expert outputs [N, K, H] in the activation dtype (K = top-k), or the sum
    itself as K = 1 where the experts reduce on their own (off the Triton kernels)."""


class SplitKPartials(Partials):
    """A skinny GEMM's fp32 split-K partial products [N, S, H] (a view of its [S, N, H] buffer); the
    sum in split order, rounded once to `dtype`, is what the GEMM's own reduction would return."""
