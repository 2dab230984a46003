"""qwen3coder: an open implementation of the Qwen3-Coder system.

Models that load real Hugging Face checkpoints (`load_model`), a paged, continuously batching engine
(`LLM`, `SamplingParams`), an OpenAI-compatible server, and the training pipeline of the bundled
default model.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def default_model_path() -> str:
    """Directory of the small default model bundled with the package."""
    path = os.path.join(_ASSETS, "qwen3coder-tiny")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"the bundled default model is not present at {path}; pass a checkpoint directory "
            "(--model PATH) instead")
    return path


def load_model(path: str | os.PathLike | None = None, device: Any = "cpu", dtype: Any = None) -> Any:
    """Load a Hugging Face checkpoint directory; `model(input_ids [B, T])` gives logits [B, T, V]."""
    import torch

    from qwen3coder.loader import load_model as _load

    return _load(path, device=device, dtype=torch.float32 if dtype is None else dtype)


def __getattr__(name: str) -> Any:  # lazy: importing qwen3coder stays cheap
    if name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput"):
        import qwen3coder.engine as engine

        return getattr(engine, name)
    if name == "ModelConfig":
        from qwen3coder.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'qwen3coder' has no attribute {name!r}")
