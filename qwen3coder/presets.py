"""Named model shapes: the released Qwen3-Coder models and tiny configs for tests.

Shapes come from the released config.json files (../shared/reference/QWEN3_CODER_FACTS.md §1).
"""

from __future__ import annotations

from qwen3coder.config import ModelConfig, RopeConfig

_VOCAB = 151936

PRESETS: dict[str, ModelConfig] = {
    # Qwen/Qwen3-Coder-30B-A3B-Instruct ("Flash")
    "30b-a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=_VOCAB, hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=5472,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        rope=RopeConfig(theta=10_000_000.0), max_position_embeddings=262144, rms_norm_eps=1e-6,
        router_aux_loss_coef=0.0, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    # Qwen/Qwen3-Coder-480B-A35B-Instruct
    "480b-a35b": ModelConfig(
        model_type="qwen3_moe", vocab_size=_VOCAB, hidden_size=6144, num_hidden_layers=62,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
        num_experts=160, num_experts_per_tok=8, moe_intermediate_size=2560, norm_topk_prob=True,
        rope=RopeConfig(theta=10_000_000.0), max_position_embeddings=262144, rms_norm_eps=1e-6,
        router_aux_loss_coef=0.0, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    # Qwen/Qwen3-Coder-Next (80B-A3B hybrid Gated DeltaNet + gated attention)
    "next-80b-a3b": ModelConfig(
        model_type="qwen3_next", vocab_size=_VOCAB, hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=5120,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, norm_topk_prob=True,
        shared_expert_intermediate_size=512,
        rope=RopeConfig(theta=5_000_000.0, partial_rotary_factor=0.25), max_position_embeddings=262144,
        rms_norm_eps=1e-6, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, router_aux_loss_coef=0.001,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    # tiny shapes for tests and CPU smoke runs
    "tiny": ModelConfig(
        model_type="qwen3_moe", vocab_size=512, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        rope=RopeConfig(theta=10_000_000.0), max_position_embeddings=4096, eos_token_id=1,
        torch_dtype="float32",
    ),
    "tiny-next": ModelConfig(
        model_type="qwen3_next", vocab_size=512, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        shared_expert_intermediate_size=32, rope=RopeConfig(theta=5_000_000.0, partial_rotary_factor=0.25),
        max_position_embeddings=4096, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, eos_token_id=1,
        torch_dtype="float32",
    ),
}
