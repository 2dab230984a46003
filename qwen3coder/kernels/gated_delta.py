"""The gated delta rule (Gated DeltaNet's recurrence) in plain PyTorch: chunked and recurrent forms.

Shapes: q, k [B, T, H, Dk] (key heads already expanded to the value heads), v [B, T, H, Dv],
g (log decay, <= 0) and beta [B, T, H]; state [B, H, Dk, Dv] in fp32. Both functions L2-normalise q
and k (eps 1e-6, as FLA and transformers), scale q by Dk^-1/2, compute in fp32 and return
(output [B, T, H, Dv] in the input dtype, final state fp32).

`recurrent_gated_delta_rule` is the definition, one token at a time (decode).
`chunk_gated_delta_rule` is the same map computed chunk by chunk (prefill): inside a chunk the delta
updates are condensed with the WY/UT representation — solving one unit-lower-triangular system —
so the work is a few matmuls per chunk instead of T sequential rank-1 updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    # -> [B, H, T, ...] fp32, q/k normalised, q scaled
    q, k, v, g, beta = (x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    state = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=q.device) if initial_state is None
             else initial_state.float().clone())
    out = torch.empty(b, h, t, dv, dtype=torch.float32, device=q.device)
    for i in range(t):
        state = state * g[:, :, i].exp()[..., None, None]
        k_t = k[:, :, i]
        memory = (state * k_t[..., None]).sum(dim=-2)  # S^T k  [B, H, Dv]
        delta = (v[:, :, i] - memory) * beta[:, :, i][..., None]
        state = state + k_t[..., None] * delta[..., None, :]
        out[:, :, i] = (state * q[:, :, i][..., None]).sum(dim=-2)
    return out.transpose(1, 2).to(dtype), state


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    c = chunk_size
    pad = (c - t % c) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n_chunks = (t + pad) // c
    # [B, H, n_chunks, C, ...]
    q, k, v = (x.view(b, h, n_chunks, c, x.shape[-1]) for x in (q, k, v))
    g, beta = g.view(b, h, n_chunks, c), beta.view(b, h, n_chunks, c)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    gamma = g.cumsum(dim=-1)  # log decay from chunk start to each position (inclusive)
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(upper, float("-inf")).exp()  # i>=j
    # WY representation: (I + L) [u | w] = [v_beta | k_beta * exp(gamma)], L strictly lower
    lhs = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(lhs, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(lhs, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay  # causal scores inside the chunk, incl. the diagonal
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    state = (torch.zeros(b, h, dk, dv, dtype=torch.float32, device=q.device) if initial_state is None
             else initial_state.float().clone())
    out = torch.empty_like(v)
    for i in range(n_chunks):
        v_new = u[:, :, i] - w[:, :, i] @ state  # the part of v the old state does not predict
        out[:, :, i] = q_decayed[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, h, n_chunks * c, dv)[:, :, :t]
    return out.transpose(1, 2).to(dtype), state
