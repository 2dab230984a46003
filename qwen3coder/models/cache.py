"""Allocation of the engine's per-layer state: the paged KV cache and the DeltaNet state slots.

Full-attention layers own `k_cache` / `v_cache` of shape `[num_blocks, block_size, num_kv_heads,
head_dim]`; a token's *slot* is `block_id * block_size + offset`. Gated DeltaNet layers own
`conv_state [num_slots, conv_dim, kernel-1]` and `ssm_state [num_slots, v_heads, k_dim, v_dim]`
(fp32); each running sequence holds one slot. The tensors are bound onto the layer modules so that
the forward pass (and a captured CUDA graph) finds them without extra arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3coder.config import ModelConfig


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all full-attention layers (K and V)."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
    return per_token * block_size * len(config.attention_layer_ids)


def state_bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one sequence's recurrent + conv state takes across all Gated DeltaNet layers."""
    if not config.linear_layer_ids:
        return 0
    conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
        config.linear_num_value_heads * config.linear_value_head_dim
    conv = conv_dim * (config.linear_conv_kernel_dim - 1) * torch.finfo(dtype).bits // 8
    ssm = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return (conv + ssm) * len(config.linear_layer_ids)


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """Create and bind the paged KV cache of every attention layer; returns the tensors.

    On the CPU the pool is left uninitialised: a large `torch.empty` is a fresh anonymous mapping whose
    pages the OS supplies (zeroed) only when first written, so a 4 GiB pool costs neither the seconds
    of a memset nor resident memory until it is used. Nothing reads a slot before writing it (the
    reference attention reads each sequence's first `seq_len` slots only). CUDA pools are zeroed: the
    decode kernels' padding rows read a scratch block."""
    tensors = []
    alloc = torch.empty if torch.device(device).type == "cpu" else torch.zeros
    for module in model.modules():
        if getattr(module, "is_paged_attention", False):
            shape = (num_blocks, block_size, module.num_kv_heads, module.head_dim)
            module.k_cache = alloc(shape, dtype=dtype, device=device)
            module.v_cache = alloc(shape, dtype=dtype, device=device)
            tensors += [module.k_cache, module.v_cache]
    return tensors


def allocate_state_cache(model: nn.Module, num_slots: int, dtype: torch.dtype,
                         device: torch.device | str) -> list[torch.Tensor]:
    """Create and bind the Gated DeltaNet state slots of every linear-attention layer."""
    tensors = []
    for module in model.modules():
        if getattr(module, "is_recurrent_mixer", False):
            module.conv_state = torch.zeros(
                (num_slots, module.conv_dim, module.conv_kernel_size - 1), dtype=dtype, device=device)
            module.ssm_state = torch.zeros(
                (num_slots, module.num_v_heads, module.head_k_dim, module.head_v_dim),
                dtype=torch.float32, device=device)
            tensors += [module.conv_state, module.ssm_state]
    return tensors


def copy_state_slot(model: nn.Module, src: int, dst: int) -> None:
    """Copy one sequence's DeltaNet state to another slot (used for n>1 forks and prefix snapshots)."""
    for module in model.modules():
        if getattr(module, "is_recurrent_mixer", False):
            module.conv_state[dst].copy_(module.conv_state[src])
            module.ssm_state[dst].copy_(module.ssm_state[src])


def free_caches(model: nn.Module) -> None:
    for module in model.modules():
        for name in ("k_cache", "v_cache", "conv_state", "ssm_state"):
            if hasattr(module, name):
                setattr(module, name, None)
