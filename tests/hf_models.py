"""Test helpers: random tiny transformers checkpoints written with `save_pretrained`.

Weights are re-drawn with a larger spread than transformers' init (and norms perturbed) so that
logits vary and every parameter matters to the comparison.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

MOE_BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
NEXT_BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
    shared_expert_intermediate_size=48, norm_topk_prob=True, max_position_embeddings=4096,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.25},
)


def hf_config(model_type: str, **overrides: Any):
    import transformers

    if model_type == "qwen3_next":
        kw = {**NEXT_BASE, **overrides}
        if "rope_parameters" in kw and "partial_rotary_factor" in kw["rope_parameters"]:
            kw["partial_rotary_factor"] = kw["rope_parameters"]["partial_rotary_factor"]
        return transformers.Qwen3NextConfig(**kw)
    kw = {**MOE_BASE, **overrides}
    if model_type == "qwen3":
        for k in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob"):
            kw.pop(k, None)
        return transformers.Qwen3Config(**kw)
    return transformers.Qwen3MoeConfig(**kw)


def hf_model(model_type: str, seed: int = 0, **overrides: Any):
    import transformers

    config = hf_config(model_type, **overrides)
    config._attn_implementation = "eager"
    cls = {"qwen3": transformers.Qwen3ForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
           "qwen3_next": transformers.Qwen3NextForCausalLM}[model_type]
    torch.manual_seed(seed)
    return randomize_(cls(config).float().eval())


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.15, norm_base: float | None = None) -> torch.nn.Module:
    """Re-draw every weight (in place): matrices N(0, std), embeddings N(0, 1), norms perturbed by 0.1
    around their current value (or around `norm_base`), DeltaNet decay parameters in a useful range."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(-1.0, 1.0)
        elif name.endswith("dt_bias"):
            p.uniform_(0.5, 1.5)
        elif "norm" in name:
            if norm_base is not None:
                p.fill_(norm_base)
            p.add_(torch.randn_like(p) * 0.1)
        elif "embed_tokens" in name:
            p.normal_(0, 1.0)
        else:
            p.normal_(0, std)
    return model


def save_hf(model, path: str, shard: bool = True) -> str:
    model.save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    return path


def rewrite_config_45x(path: str) -> None:
    """Rewrite a transformers-5 config.json the way 4.5x-era checkpoints (the real ones) spell it."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope_type = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, "type": rope_type, **rope}
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.52.3"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
