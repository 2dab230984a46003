"""Rotary position embeddings: default RoPE and YaRN, exactly as transformers computes them.

Layout is NeoX "rotate_half" (not interleaved). With `partial_rotary_factor < 1` (Qwen3-Next) only the
first `rotary_dim` channels of each head rotate; the rest pass through. Angles are computed in fp32
from the positions of the flattened batch; cos/sin are scaled by YaRN's attention factor and cast to
the activation dtype before use, as in transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen3coder.config import RopeConfig


def compute_inv_freq(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] (fp32) and the cos/sin scaling factor."""
    base = rope.theta
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    if rope.rope_type == "default":
        return 1.0 / (base ** exponents), 1.0
    assert rope.rope_type == "yarn", rope.rope_type
    factor = rope.factor
    orig = rope.original_max_position_embeddings
    assert factor is not None and orig is not None

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32.0
    beta_slow = rope.beta_slow or 1.0

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = base ** exponents
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [N, Hq, D] and k [N, Hk, D] at `positions` [N]."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq, self.attention_scaling = compute_inv_freq(rope, self.rotary_dim)
        # not a parameter or persistent buffer: recomputed, never loaded; kept off the meta device
        self._inv_freq_cpu = inv_freq
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        # one rotary module serves every layer: `prepare` computes a step's cos/sin once (the decoder
        # calls it at the start of every forward), the layers reuse them
        self._step: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._inv_freq.get(device)
        if t is None:
            t = self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return t

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """Compute cos/sin for this step's positions; layers called with the same tensor reuse them."""
        self._step = (positions, dtype, *self.cos_sin(positions, dtype))

    def step_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, rotary_dim]` for `positions`: the prepared step's rows when `positions` is the
        tensor `prepare` saw (and `dtype` matches), else computed now and kept for the next layer."""
        step = self._step
        if step is not None and step[0] is positions and step[1] == dtype:
            return step[2], step[3]
        # called outside a prepared step, or a different dtype (autocast)
        cos, sin = self.cos_sin(positions, dtype)
        self._step = (positions, dtype, cos, sin)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.step_cos_sin(positions, q.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
