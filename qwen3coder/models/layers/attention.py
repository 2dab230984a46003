"""Self-attention of the Qwen3 family over a flattened batch, with a paged KV cache.

`Qwen3Attention` is the whole mixer: packed QKV projection, per-head QK RMSNorm before RoPE, GQA,
optional sigmoid output gate (Qwen3-Next's gated attention, where `q_proj` emits query and gate per
head) and the output projection. `PagedAttention` is the core: it writes the new keys and values at
`ctx.slot_mapping` and attends over each sequence's blocks. This module holds the plain-PyTorch
reference path; the Triton kernels in `qwen3coder.kernels` are checked against it. On the Triton
path a cached step fuses the prologue (QK-norm, RoPE, KV store: `qwen3coder.kernels.qk_norm_rope`)
and then attends with `PagedAttention.attend_cached`; opt-in, a decode step folds that prologue into
the decode attention kernel itself (`FOLD_DECODE_PROLOGUE`, measured slower).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from qwen3coder.kernels import use_triton
from qwen3coder.models.context import ForwardContext
from qwen3coder.models.layers.linear import Linear
from qwen3coder.models.layers.norms import RMSNorm
from qwen3coder.models.layers.rotary import RotaryEmbedding


# Opt-in (QWEN3CODER_FOLD_QK_ROPE=1): decode steps fold QK-norm, RoPE and the KV store into the attention
# kernel (`kernels.paged_attention.DecodePrologue`): one launch fewer per layer, same bits, but slower on an
# H200 at 30B-A3B decode (`qk_rope_unfolded` of benchmarks/bench_decode_variants.py,
# benchmarks/results/decode_variants_30b-a3b-20261130T111135.json): batch 1 361.7-366.4 vs 380.6-382.4 tok/s,
# batch 2 520-527 vs 538, batch 16 even. The split holding the new token norms, rotates and stores the key
# before its tile loop can read it back, which lengthens the critical path more than the launch saved.
FOLD_DECODE_PROLOGUE = os.environ.get("QWEN3CODER_FOLD_QK_ROPE", "0") == "1"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q [Hq, Tq, D], k/v [Hk, Tk, D] -> [Tq, Hq, D]; GQA by repeating KV heads."""
    rep = q.shape[0] // k.shape[0]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
    # 4-D [1, H, T, D]: SDPA's flash / memory-efficient kernels need a batch dimension (3-D inputs
    # fall back to the math path, which materialises the [H, Tq, Tk] scores)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                         is_causal=causal and mask is None, scale=scale)
    return out[0].transpose(0, 1)


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v per sequence, causal, over cached + new keys."""

    is_paged_attention = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hk, D] -> [N, Hq, D]."""
        if not ctx.uses_cache:
            return self._forward_no_cache(q, k, v, ctx)
        assert self.k_cache is not None, "KV cache not allocated (qwen3coder.models.cache.allocate_kv_cache)"
        # decode on the Triton path: device tensors only (CUDA-graph safe), decode never has -1 slots
        store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, all_valid=ctx.is_decode and use_triton(q))
        return self.attend_cached(q, ctx)

    def attend_cached(self, q: torch.Tensor, ctx: ForwardContext, prologue=None) -> torch.Tensor:
        """q [N, Hq, D] -> [N, Hq, D] over the cache, into which this step's keys and values are
        already written (by `forward`, or by the fused prologue of `Qwen3Attention`) — or, for a decode
        step on the Triton path with `prologue` (`kernels.paged_attention.DecodePrologue`), are written
        by the attention kernel itself from the raw projections."""
        assert self.k_cache is not None, "KV cache not allocated (qwen3coder.models.cache.allocate_kv_cache)"
        assert prologue is None or (use_triton(q) and ctx.is_decode), "the folded prologue is for Triton decode"
        if use_triton(q):
            if ctx.is_decode:
                from qwen3coder.kernels.paged_attention import paged_attention_decode

                return paged_attention_decode(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.seq_lens,
                                              self.scale, max_seq_len=max(ctx.seq_lens_cpu), prologue=prologue)
            from qwen3coder.kernels import paged_prefill

            # prefill, chunked prefill and mixed prefill+decode steps: one launch for the whole batch
            return paged_prefill.paged_attention_varlen(q, self.k_cache, self.v_cache, ctx.block_tables,
                                                        ctx.query_start_loc, ctx.seq_lens, self.scale,
                                                        max(ctx.query_lens_cpu), ctx.tile_map, ctx.tile_block_m,
                                                        max_seq_len=max(ctx.seq_lens_cpu))
        return paged_attention_reference(q, self.k_cache, self.v_cache, ctx, self.scale)

    def _forward_no_cache(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        lens = ctx.query_lens_cpu
        if len(set(lens)) == 1:  # equal lengths: one batched call
            b, t = len(lens), lens[0]
            qb = q.view(b, t, *q.shape[1:]).transpose(1, 2)
            kb = k.view(b, t, *k.shape[1:]).transpose(1, 2)
            vb = v.view(b, t, *v.shape[1:]).transpose(1, 2)
            rep = self.num_heads // self.num_kv_heads
            if rep > 1:
                kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=self.scale)
            return out.transpose(1, 2).reshape(q.shape)
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            outs.append(_sdpa(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                              self.scale, None, True))
            start += n
        return torch.cat(outs, dim=0)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, all_valid: bool = False) -> None:
    """Write new keys/values [N, Hk, D] into the paged cache at their slots (slot -1: skip)."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if all_valid:
        flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))
        return
    keep = slot_mapping >= 0
    if bool(keep.all()):
        flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))
    else:
        flat_k[slot_mapping[keep]] = k[keep].to(flat_k.dtype)
        flat_v[slot_mapping[keep]] = v[keep].to(flat_v.dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              ctx: ForwardContext, scale: float) -> torch.Tensor:
    """Plain-PyTorch paged attention (prefill, chunked prefill and decode alike).

    Sequence s's new queries sit at positions `context_len .. seq_len-1`; each attends to cached keys
    0..its own position, gathered from the sequence's blocks.
    """
    block_size = k_cache.shape[1]
    assert ctx.block_tables is not None
    out = torch.empty_like(q)
    start = 0
    for s, (n_q, n_k) in enumerate(zip(ctx.query_lens_cpu, ctx.seq_lens_cpu)):
        n_blocks = (n_k + block_size - 1) // block_size
        blocks = ctx.block_tables[s, :n_blocks].long()
        ks = k_cache.index_select(0, blocks).flatten(0, 1)[:n_k].to(q.dtype)  # [n_k, Hk, D]
        vs = v_cache.index_select(0, blocks).flatten(0, 1)[:n_k].to(q.dtype)
        qs = q[start:start + n_q]
        # query i sits at position n_k - n_q + i: causal aligned to the bottom-right corner. A bias
        # object (not a boolean mask) keeps SDPA on its memory-efficient kernels for long prompts.
        mask = causal_lower_right(n_q, n_k) if 1 < n_q < n_k else None
        out[start:start + n_q] = _sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                       scale, mask, n_q == n_k and n_q > 1)
        start += n_q
    return out


class Qwen3Attention(nn.Module):
    """Qwen3 / Qwen3-MoE attention, or Qwen3-Next gated attention with `output_gate=True`."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, rms_norm_eps: float, bias: bool = False,
                 output_gate: bool = False, zero_centered_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.output_gate = output_gate
        self.q_size = num_heads * head_dim * (2 if output_gate else 1)
        self.kv_size = num_kv_heads * head_dim
        # packed [q | k | v] projection; checkpoints' q_proj/k_proj/v_proj load into its shards
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, zero_centered=zero_centered_norm)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, zero_centered=zero_centered_norm)
        self.rotary = rotary
        self.attn = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5)

    packed_shards = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    # cached steps on the Triton path run QK-norm, RoPE and the KV store as one kernel
    # (qwen3coder.kernels.qk_norm_rope); False keeps the unfused path (tests compare the two)
    fused_prologue = True

    def shard_slices(self) -> list[slice]:
        q, kv = self.q_size, self.kv_size
        return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        gate = None
        if self.output_gate:
            q, gate = q.view(n, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(n, -1)
        if self.fused_prologue and ctx.uses_cache and use_triton(qkv) \
                and self.q_norm.weight.dtype == qkv.dtype:
            out = self._forward_fused(positions, q, k, v, ctx).reshape(n, -1)
        else:
            q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim))
            v = v.reshape(n, self.num_kv_heads, self.head_dim)
            q, k = self.rotary(positions, q, k)
            out = self.attn(q, k, v, ctx).reshape(n, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _forward_fused(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ctx: ForwardContext) -> torch.Tensor:
        """q (views of the qkv projection: [N, Hq*D] or, gated, [N, Hq, D]), k, v [N, Hk*D] ->
        attention output [N, Hq, D]; one kernel norms and rotates q and k and stores k and v — a kernel of
        its own, or at decode with `FOLD_DECODE_PROLOGUE` the attention kernel itself."""
        from qwen3coder.kernels.paged_attention import DecodePrologue
        from qwen3coder.kernels.qk_norm_rope import fused_qk_norm_rope_store

        assert self.attn.k_cache is not None, "KV cache not allocated (qwen3coder.models.cache.allocate_kv_cache)"
        n = q.shape[0]
        cos, sin = self.rotary.step_cos_sin(positions, q.dtype)
        q = q.view(n, self.num_heads, self.head_dim)
        k, v = k.view(n, self.num_kv_heads, self.head_dim), v.view(n, self.num_kv_heads, self.head_dim)
        if FOLD_DECODE_PROLOGUE and ctx.is_decode:
            return self.attn.attend_cached(q, ctx, DecodePrologue(
                k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, ctx.slot_mapping,
                self.q_norm.zero_centered))
        q = fused_qk_norm_rope_store(q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin,
                                     self.attn.k_cache, self.attn.v_cache, ctx.slot_mapping,
                                     zero_centered=self.q_norm.zero_centered)
        return self.attn.attend_cached(q, ctx)
