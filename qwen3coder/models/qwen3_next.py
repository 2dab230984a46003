"""Qwen3-Next (Qwen3-Coder-Next 80B-A3B): hybrid Gated DeltaNet + gated attention, MoE with shared expert.

`layer_types[i]` picks the mixer: `linear_attention` -> `linear_attn` (Gated DeltaNet),
`full_attention` -> `self_attn` (gated attention: sigmoid output gate from q_proj, partial RoPE on
the first 25% of each head). All norms except the DeltaNet output norm are zero-centred RMSNorms
(`y = x̂ (1 + w)`). Every FFN is the sparse MoE plus the sigmoid-gated shared expert: with the
shared expert added to its sum, the MoE block always returns [N, H] (no `TopKPartials`); the layer
returns it with the residual for the next norm to add, as in `qwen3_moe`. The mixers' output
projections may return `SplitKPartials` (Triton path), which only `post_attention_layernorm` takes.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3coder.config import ModelConfig
from qwen3coder.models.base import CausalLM, DecoderModel
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.attention import Qwen3Attention
from qwen3coder.models.layers.deltanet import GatedDeltaNet
from qwen3coder.models.layers.moe import TopKPartials
from qwen3coder.models.layers.norms import RMSNorm
from qwen3coder.models.layers.rotary import RotaryEmbedding
from qwen3coder.models.qwen3_moe import build_ffn


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config.hidden_size, config.linear_num_key_heads,
                                             config.linear_num_value_heads, config.linear_key_head_dim,
                                             config.linear_value_head_dim, config.linear_conv_kernel_dim,
                                             config.rms_norm_eps)
        else:
            self.self_attn = Qwen3Attention(config.hidden_size, config.num_attention_heads,
                                            config.num_key_value_heads, config.head_dim, rotary,
                                            config.rms_norm_eps, bias=config.attention_bias,
                                            output_gate=True, zero_centered_norm=True)
        self.mlp = build_ffn(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=True)
        out_proj = self.linear_attn.out_proj if self.layer_type == "linear_attention" else self.self_attn.o_proj
        out_proj.fold_split_k = True  # its output goes only to post_attention_layernorm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | TopKPartials, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor | TopKPartials, torch.Tensor]:
        """(FFN output, residual) for the next layer's input_layernorm to add."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.layer_type == "linear_attention":
            hidden = self.linear_attn(hidden, ctx)
        else:
            hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3NextForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        assert config.model_type == "qwen3_next", config.model_type
        rotary = RotaryEmbedding(config.rope, config.head_dim)
        layers = [Qwen3NextDecoderLayer(config, i, rotary) for i in range(config.num_hidden_layers)]
        super().__init__(config, DecoderModel(config, layers, zero_centered_norm=True, rotary=rotary))
