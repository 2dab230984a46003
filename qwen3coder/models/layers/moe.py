"""Sparse mixture of experts of Qwen3-MoE and Qwen3-Next.

Router: `router_logits = x W_gate^T` -> softmax in fp32 -> top-k -> renormalise when
`norm_topk_prob` -> cast to the activation dtype. Experts are SwiGLU MLPs stored packed, the layout
fused kernels want: `experts.gate_up_proj [E, 2*I, H]` (gate rows first) and
`experts.down_proj [E, H, I]` — transformers 5's layout; the checkpoints' per-expert tensors are packed
into it at load time. Qwen3-Next adds an always-on shared expert scaled by `sigmoid(shared_expert_gate(x))`.

`moe_forward_reference` is the plain-PyTorch path (one matmul pair per expert that received tokens);
`qwen3coder.kernels` holds the fused Triton versions checked against it. On the Triton path routing
and alignment are Triton kernels (`kernels.moe_routing.route_align`: one launch for decode-sized
batches, three for prefill-sized ones) whose expert-grouped layout goes straight to `fused_moe`;
training (autograd on) and CPU use `route` with the reference experts.

Output contract: `SparseMoeBlock.forward` returns the [N, H] sum, except when its `fold_topk_sum` is
set (the decoder layers set it: their FFN output goes only to the next `RMSNorm(hidden, residual)`),
the Triton path runs and there is no shared expert (Qwen3-MoE): then it returns `TopKPartials`, the
unsummed weighted expert outputs [N, K, H], and the next norm's fused add+RMSNorm kernel does the
top-k sum. The reference (PyTorch) path and Qwen3-Next (the shared expert is added to the sum) always
return [N, H].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.kernels import use_triton
from qwen3coder.models.layers.linear import Linear
from qwen3coder.models.layers.mlp import SwiGLUMLP
from qwen3coder.models.layers.norms import RMSNorm
from qwen3coder.models.layers.partials import Partials, TopKPartials


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [N, k] in `dtype`, topk_ids [N, k]) from router logits [N, E]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(dtype), topk_ids


def moe_forward_reference(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                          topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · Expert_{id_k}(x) for x [N, H]; loops over the experts that received tokens."""
    out = torch.zeros_like(x)
    num_experts = gate_up_proj.shape[0]
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.flatten()[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx = token_of[start:start + c]
        gate, up = F.linear(x[idx], gate_up_proj[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_proj[e]) * weight_of[start:start + c, None]
        # a token picks an expert at most once, so `idx` has no repeats and this read-add-write adds
        # in the same order as transformers' `index_add_` (which is ~1000x slower on some CPU builds)
        out[idx] = out[idx] + h.to(out.dtype)
        start += c
    return out


# post-attention norm + router + routing in one launch at decode (`SparseMoeBlock.forward_with_norm`);
# H200, 30B-A3B decode: batch 1 / 2 / 4 / 16 from 333 / 505 / 743 / 1,457 to 342 / 517 / 749 / 1,463 tok/s
# (benchmarks/results/decode_variants_30b-a3b-20261130T084348.json). QWEN3CODER_FUSED_ROUTER=0: off.
FUSED_NORM_ROUTER = os.environ.get("QWEN3CODER_FUSED_ROUTER", "1") != "0"
# that launch skips the expert-sorted layout when the MoE GEMVs (`kernels.moe_gemv`) take the rows: they
# find each pair's expert in topk_ids. False: always build it (benchmarks compare the two).
SKIP_ALIGN_FOR_GEMV = True


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                align: tuple[torch.Tensor, torch.Tensor] | None = None, reduce: bool = True) -> torch.Tensor:
        """Σ_k w_k · Expert_{id_k}(x) [N, H]; `reduce=False`: partials [N, K', H] summing to it — the
        K = top_k weighted expert outputs on the Triton path, the sum itself as K' = 1 elsewhere.

        `align`: (sorted_ids, block_expert) of `moe_align(topk_ids, E, moe_block_m(pairs, E))` when the
        caller already has them (fused routing); only the Triton path uses them."""
        if use_triton(x):
            from qwen3coder.kernels.fused_moe import fused_moe, moe_block_m

            sorted_ids, block_expert = align if align is not None else (None, None)
            return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                             moe_block_m(topk_ids.numel(), self.num_experts), sorted_ids, block_expert,
                             reduce=reduce)
        out = moe_forward_reference(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return out if reduce else out.unsqueeze(1)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 norm_topk_prob: bool, shared_expert_intermediate_size: int = 0) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # kept when `keep_router_logits` (training)
        self.keep_router_logits = False
        # True where the output goes only to the next RMSNorm(hidden, residual) (decoder layers):
        # the Triton path may then return TopKPartials (see the module docstring)
        self.fold_topk_sum = False
        self.fused_routing = True  # Triton path: route in Triton; False: `route` + `moe_align` (benchmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor | TopKPartials:
        """x [N, H] -> the MoE output [N, H], or `TopKPartials` [N, K, H] when `fold_topk_sum` is set,
        the Triton path runs and there is no shared expert."""
        router_logits = self.gate(x)
        if self.keep_router_logits:
            self.router_logits = router_logits
        fast = use_triton(x)
        reduce = not (fast and self.fold_topk_sum and self.shared_expert is None)
        if fast and self.fused_routing:
            out = self._fused_routing_experts(x, router_logits, reduce)
        else:
            topk_weights, topk_ids = route(router_logits, self.top_k, self.norm_topk_prob, x.dtype)
            out = self.experts(x, topk_weights, topk_ids, reduce=reduce)
        if not reduce:
            return TopKPartials(out)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def forward_with_norm(self, hidden: torch.Tensor | Partials, residual: torch.Tensor, norm: RMSNorm
                          ) -> tuple[torch.Tensor | TopKPartials, torch.Tensor]:
        """`(self(x), new_residual)` where `(x, new_residual) = norm(hidden, residual)`: the decoder layer's
        post-attention norm and this block. Unless `QWEN3CODER_FUSED_ROUTER=0`, on the Triton path, for
        decode-sized batches and without a shared expert, the norm, the router GEMV and the routing
        run as one launch (`kernels.norm_router`); otherwise exactly `norm` then `forward`."""
        from qwen3coder.kernels.norm_router import norm_router_fits

        n, h = residual.shape
        if not (FUSED_NORM_ROUTER and self.fused_routing and self.shared_expert is None and not self.keep_router_logits
                and use_triton(residual) and norm_router_fits(n, h, self.experts.num_experts, self.top_k)
                and self.gate.bias is None and self.gate.weight.dtype == residual.dtype
                and norm.weight.dtype == residual.dtype):
            x, residual = norm(hidden, residual)
            return self(x), residual
        from qwen3coder.kernels.fused_moe import moe_block_m
        from qwen3coder.kernels.moe_gemv import moe_gemv_config
        from qwen3coder.kernels.norm_router import fused_norm_router_route

        x = hidden.partials if isinstance(hidden, Partials) else hidden
        # rows that the MoE GEMVs take need no expert-sorted layout: the routing skips it
        align = not (SKIP_ALIGN_FOR_GEMV and moe_gemv_config(n, residual, self.experts.gate_up_proj) is not None)
        x, residual, _, r = fused_norm_router_route(x, residual, norm.weight, norm.eps, norm.zero_centered,
                                                    self.gate.weight, self.top_k, self.norm_topk_prob,
                                                    moe_block_m(n * self.top_k, self.experts.num_experts),
                                                    align=align)
        reduce = not self.fold_topk_sum
        # without the layout (None, None): the GEMVs need none
        out = self.experts(x, r.topk_weights, r.topk_ids, align=(r.sorted_ids, r.block_expert), reduce=reduce)
        return (out if reduce else TopKPartials(out)), residual

    def _fused_routing_experts(self, x: torch.Tensor, router_logits: torch.Tensor, reduce: bool = True
                               ) -> torch.Tensor:
        """The experts' output (partials when not `reduce`) with routing + alignment in Triton: one
        launch for decode-sized batches (`fused_route_align`), three for larger ones (`tiled_route_align`)."""
        from qwen3coder.kernels.fused_moe import moe_block_m
        from qwen3coder.kernels.moe_routing import route_align

        block_m = moe_block_m(router_logits.shape[0] * self.top_k, router_logits.shape[1])
        r = route_align(router_logits, self.top_k, self.norm_topk_prob, block_m, x.dtype)
        return self.experts(x, r.topk_weights, r.topk_ids, align=(r.sorted_ids, r.block_expert), reduce=reduce)
