"""SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` with gate and up packed in one projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.models.layers.linear import Linear


class SwiGLUMLP(nn.Module):
    packed_shards = {"gate_proj": 0, "up_proj": 1}

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def shard_slices(self) -> list[slice]:
        i = self.intermediate_size
        return [slice(0, i), slice(i, 2 * i)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
