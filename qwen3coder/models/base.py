"""What every qwen3coder causal LM shares: the decoder stack, the three entry points, weight loading.

Entry points:
* `model(input_ids [B, T]) -> logits [B, T, V]` — the plain reference forward over whole sequences
  (no cache), the path tests compare with transformers;
* `model.forward_step(input_ids [N], positions [N], ctx) -> hidden [N, H]` — one engine step over a
  flattened batch, with the paged KV cache and DeltaNet state slots described by `ctx`;
* `model.compute_logits(hidden [M, H]) -> logits [M, V]`.

`load_weights` maps Hugging Face checkpoint tensor names onto the packed parameters (see
`qwen3coder.models.weights`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from qwen3coder.config import ModelConfig
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.linear import Linear
from qwen3coder.models.layers.norms import RMSNorm


class DecoderModel(nn.Module):
    """`model.*` of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, layers: list[nn.Module], zero_centered_norm: bool,
                 rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary  # shared by the attention layers; no parameters
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, zero_centered=zero_centered_norm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [N, H] after the final norm. Between layers `hidden` is a layer's FFN output
        not yet added to `residual` — on the Triton path a MoE layer's `TopKPartials` — which only
        the next RMSNorm(hidden, residual) consumes: don't read it here (e.g. to tap hidden states);
        take the norm's new residual (the running sum) instead."""
        hidden = self.embed_tokens(input_ids)
        self.rotary.prepare(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, model: DecoderModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fp8_weight_scales: dict[str, torch.Tensor] = {}  # filled by the loader for FP8 checkpoints

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode reads only device tensors (Triton kernels), so the CUDA runner may capture it."""
        from qwen3coder.kernels import triton_enabled

        return triton_enabled()

    # ---------------------------------------------------------------- entry points
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reference forward: logits [B, T, V] for whole sequences, no cache."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).repeat(b)
        ctx = ForwardContext.no_cache([t] * b, input_ids.device)
        hidden = self.forward_step(input_ids.reshape(-1), positions, ctx)
        return self.compute_logits(hidden).view(b, t, -1)

    def forward_step(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (checkpoint name, tensor) pairs into the parameters; returns the names used."""
        from qwen3coder.models.weights import WeightLoader

        loader = WeightLoader(self)
        for name, tensor in weights:
            loader.load(name, tensor)
        loader.check_complete()
        return loader.used_names
