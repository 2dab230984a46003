"""Gated DeltaNet, the linear-attention mixer of Qwen3-Next, with per-sequence state slots.

Per token: project to q, k, v (+ output gate z, and b, a), run a causal depthwise conv (kernel 4)
+ SiLU over [q|k|v], then the gated delta rule per value head with state S [d_k, d_v] (fp32):

    S <- exp(g_t) S ;  delta_t = beta_t (v_t - S^T k_t) ;  S <- S + k_t delta_t^T ;  o_t = S^T q_t

with beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias), q and k L2-normalised and q scaled by
d_k^-1/2. The output goes through a gated RMSNorm (z) and `out_proj`.

Two exact forms of the recurrence live in `qwen3coder.kernels.gated_delta`: a chunked parallel form
for prefill and the token recurrence for decode; tests check them against each other. The engine's
state for each sequence is a slot in `conv_state [slots, conv_dim, kernel-1]` (the last inputs of
the conv) and `ssm_state [slots, v_heads, d_k, d_v]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3coder.kernels.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.linear import Linear
from qwen3coder.models.layers.norms import RMSNormGated


class GatedDeltaNet(nn.Module):
    is_recurrent_mixer = True

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_kernel_size: int, rms_norm_eps: float) -> None:
        super().__init__()
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = conv_kernel_size
        self.in_proj_qkvz = Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel_size, groups=self.conv_dim,
                                bias=False, padding=conv_kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(num_v_heads))
        self.norm = RMSNormGated(head_v_dim, rms_norm_eps)
        self.out_proj = Linear(self.value_dim, hidden_size, bias=False)
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def _split_projections(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """Undo the per-key-head grouping of the checkpoint's fused projections."""
        n = qkvz.shape[0]
        ratio = self.num_v_heads // self.num_k_heads
        qkvz = qkvz.view(n, self.num_k_heads, 2 * self.head_k_dim + 2 * ratio * self.head_v_dim)
        ba = ba.view(n, self.num_k_heads, 2 * ratio)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, ratio * self.head_v_dim,
                                 ratio * self.head_v_dim], dim=-1)
        b, a = ba.split([ratio, ratio], dim=-1)
        return (q.reshape(n, self.key_dim), k.reshape(n, self.key_dim), v.reshape(n, self.value_dim),
                z.reshape(n, self.num_v_heads, self.head_v_dim),
                b.reshape(n, self.num_v_heads), a.reshape(n, self.num_v_heads))

    def _conv(self, x: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU of x [T, C] after `history` [C, K-1]; returns (y, new history)."""
        k = self.conv_kernel_size
        xt = x.t().to(self.conv1d.weight.dtype)
        if history is None:
            history = xt.new_zeros(self.conv_dim, k - 1)
        full = torch.cat([history.to(xt.dtype), xt], dim=-1)  # [C, K-1+T]
        y = F.conv1d(full[None], self.conv1d.weight, groups=self.conv_dim)[0]  # [C, T]
        return F.silu(y).t().to(x.dtype), full[:, -(k - 1):]

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = hidden.shape[0]
        q, k, v, z, b, a = self._split_projections(self.in_proj_qkvz(hidden), self.in_proj_ba(hidden))
        mixed = torch.cat([q, k, v], dim=-1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        use_state = ctx.state_indices is not None
        if use_state:
            assert self.ssm_state is not None, "state cache not allocated (allocate_state_cache)"
        if use_state and ctx.is_decode:
            core = self._decode(mixed, beta, g, ctx)
        else:
            core = self._prefill(mixed, beta, g, ctx)
        out = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(n, self.value_dim))

    def _qkv_heads(self, mixed: torch.Tensor):
        t = mixed.shape[0]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(t, self.num_k_heads, self.head_k_dim)
        ratio = self.num_v_heads // self.num_k_heads
        if ratio > 1:
            q, k = q.repeat_interleave(ratio, dim=1), k.repeat_interleave(ratio, dim=1)
        return q, k, v.reshape(t, self.num_v_heads, self.head_v_dim)

    def _prefill(self, mixed, beta, g, ctx: ForwardContext) -> torch.Tensor:
        outs, start = [], 0
        use_state = ctx.state_indices is not None
        for s, n_q in enumerate(ctx.query_lens_cpu):
            sl = slice(start, start + n_q)
            start += n_q
            slot = int(ctx.state_indices[s]) if use_state else None
            resume = use_state and bool(ctx.has_initial_state_cpu and ctx.has_initial_state_cpu[s])
            history = self.conv_state[slot] if resume else None
            y, new_history = self._conv(mixed[sl], history)
            q, k, v = self._qkv_heads(y)
            init = self.ssm_state[slot] if resume else None
            o, final = chunk_gated_delta_rule(q[None], k[None], v[None], g[sl][None], beta[sl][None],
                                              initial_state=None if init is None else init[None])
            if use_state:
                self.conv_state[slot].copy_(new_history)
                self.ssm_state[slot].copy_(final[0])
            outs.append(o[0])
        return torch.cat(outs, dim=0)

    def _decode(self, mixed, beta, g, ctx: ForwardContext) -> torch.Tensor:
        """One new token per sequence: batched conv-state update and one recurrence step."""
        slots = ctx.state_indices
        history = self.conv_state[slots]  # [S, C, K-1]
        has_init = ctx.has_initial_state_cpu
        if has_init is not None and not all(has_init):
            keep = torch.tensor(has_init, device=history.device, dtype=history.dtype)[:, None, None]
            history = history * keep
        xt = mixed.to(history.dtype)[:, :, None]  # [S, C, 1]
        full = torch.cat([history, xt], dim=-1)  # [S, C, K]
        y = F.silu((full * self.conv1d.weight[:, 0, :][None]).sum(-1)).to(mixed.dtype)  # [S, C]
        self.conv_state[slots] = full[:, :, 1:]
        q, k, v = self._qkv_heads(y)
        state = self.ssm_state[slots]
        if has_init is not None and not all(has_init):
            state = state * torch.tensor(has_init, device=state.device, dtype=state.dtype)[:, None, None, None]
        o, final = recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                              initial_state=state)
        self.ssm_state[slots] = final
        return o[:, 0]
