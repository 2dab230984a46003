"""Qwen3-MoE (Qwen3-Coder-30B-A3B and 480B-A35B) and dense Qwen3: the same decoder.

Each layer: `h += Attention(RMSNorm(h))` with GQA and per-head QK-norm before RoPE, then
`h += FFN(RMSNorm(h))` where the FFN is the sparse MoE (`mlp.gate` router + 128/160 SwiGLU experts)
or, for `mlp_only_layers` / `decoder_sparse_step` / model_type `qwen3`, a dense SwiGLU MLP.

A layer returns `(ffn_output, residual)` without adding them: the next layer's `input_layernorm` (or
the model's final `norm`) does `norm(ffn_output + residual)` in one fused kernel. On the Triton path a
MoE FFN's output is `TopKPartials` (its top-k sum folded into that kernel too), and the attention
output projection's may be `SplitKPartials` (the skinny GEMM's split-K sum folded into
`post_attention_layernorm`); only RMSNorm takes them (`qwen3coder.models.layers.partials`).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3coder.config import ModelConfig
from qwen3coder.models.base import CausalLM, DecoderModel
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.attention import Qwen3Attention
from qwen3coder.models.layers.mlp import SwiGLUMLP
from qwen3coder.models.layers.moe import SparseMoeBlock, TopKPartials
from qwen3coder.models.layers.norms import RMSNorm
from qwen3coder.models.layers.rotary import RotaryEmbedding


def build_ffn(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The FFN of decoder layer `layer_idx`. Its output goes only to the next RMSNorm(hidden, residual),
    so a MoE block folds its top-k sum into that norm (`fold_topk_sum`; no-op with a shared expert)."""
    if config.is_moe_layer(layer_idx):
        block = SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                               config.moe_intermediate_size, config.norm_topk_prob,
                               config.shared_expert_intermediate_size)
        block.fold_topk_sum = True
        return block
    return SwiGLUMLP(config.hidden_size, config.intermediate_size)


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Qwen3Attention(config.hidden_size, config.num_attention_heads,
                                        config.num_key_value_heads, config.head_dim, rotary,
                                        config.rms_norm_eps, bias=config.attention_bias)
        self.mlp = build_ffn(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn.o_proj.fold_split_k = True  # its output goes only to post_attention_layernorm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | TopKPartials, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor | TopKPartials, torch.Tensor]:
        """(FFN output, residual) for the next layer's input_layernorm to add (see the module docstring)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        if isinstance(self.mlp, SparseMoeBlock):  # may fuse the norm with the router and routing
            return self.mlp.forward_with_norm(hidden, residual, self.post_attention_layernorm)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        assert config.model_type in ("qwen3", "qwen3_moe"), config.model_type
        rotary = RotaryEmbedding(config.rope, config.head_dim)
        layers = [Qwen3MoeDecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)]
        super().__init__(config, DecoderModel(config, layers, zero_centered_norm=False, rotary=rotary))
