"""The Qwen3-Coder model family in PyTorch: `build_model(config)` picks the architecture."""

from __future__ import annotations

from qwen3coder.config import ModelConfig
from qwen3coder.models.base import CausalLM
from qwen3coder.models.context import ForwardContext


def build_model(config: ModelConfig) -> CausalLM:
    """Instantiate the model for `config` (on the current default device and dtype)."""
    if config.model_type in ("qwen3", "qwen3_moe"):
        from qwen3coder.models.qwen3_moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(config)
    if config.model_type == "qwen3_next":
        from qwen3coder.models.qwen3_next import Qwen3NextForCausalLM

        return Qwen3NextForCausalLM(config)
    raise ValueError(f"unsupported model_type {config.model_type!r}")


__all__ = ["build_model", "CausalLM", "ForwardContext", "ModelConfig"]
