"""Layer-level checks: the two forms of the gated delta rule, RoPE/YaRN against transformers."""

from __future__ import annotations

import pytest
import torch

from qwen3coder.config import ModelConfig, RopeConfig
from qwen3coder.kernels.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen3coder.models.layers.rotary import compute_inv_freq


def _delta_inputs(b=2, t=150, h=3, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g)
    k = torch.randn(b, t, h, dk, generator=g)
    v = torch.randn(b, t, h, dv, generator=g)
    decay = -torch.rand(b, t, h, generator=g) * 0.5
    beta = torch.rand(b, t, h, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("t", [1, 5, 64, 150])
def test_chunked_equals_recurrent(t):
    q, k, v, g, beta = _delta_inputs(t=t)
    init = torch.randn(2, 3, 16, 8) * 0.1
    o1, s1 = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init)
    o2, s2 = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=init)
    torch.testing.assert_close(o2, o1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-4)


def test_chunked_in_pieces_equals_whole():
    q, k, v, g, beta = _delta_inputs(t=130)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta)
    a, s_a = chunk_gated_delta_rule(q[:, :50], k[:, :50], v[:, :50], g[:, :50], beta[:, :50])
    b, s_b = chunk_gated_delta_rule(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], beta[:, 50:], initial_state=s_a)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_b, s_whole, atol=1e-4, rtol=1e-4)


def test_matches_transformers_delta_rule():
    tf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta = _delta_inputs(t=100)
    ref, ref_state = tf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
    out, state = chunk_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=1e7),
    dict(rope_type="yarn", rope_theta=1e7, factor=4.0, original_max_position_embeddings=262144),
    dict(rope_type="yarn", rope_theta=5e6, factor=8.0, original_max_position_embeddings=4096,
         beta_fast=16.0, beta_slow=2.0, partial_rotary_factor=0.25),
    dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=2048, truncate=False),
])
def test_inv_freq_matches_transformers(rope):
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = dict(hidden_size=64, num_attention_heads=4, head_dim=128, num_key_value_heads=2,
                  rope_parameters=dict(rope), max_position_embeddings=262144 * 4)
    if "partial_rotary_factor" in rope:
        kwargs["partial_rotary_factor"] = rope["partial_rotary_factor"]
    hf_cfg = tr.Qwen3MoeConfig(**kwargs)
    ours = ModelConfig.from_hf(hf_cfg.to_dict())
    inv, scale = compute_inv_freq(ours.rope, ours.rotary_dim)
    if rope["rope_type"] == "default":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

        ref_inv, ref_scale = Qwen3MoeRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    assert torch.equal(inv, ref_inv.float()) and scale == pytest.approx(ref_scale)


def test_rope_config_defaults():
    assert RopeConfig().rope_type == "default"


def test_rotary_cos_sin_computed_once_per_step():
    from qwen3coder.models.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(RopeConfig(theta=1e4), 32)
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    pos = torch.arange(5)
    rope.prepare(pos, q.dtype)
    cached = rope._step
    first = rope(pos, q, k)
    assert rope._step is cached  # the layers of a step reuse the prepared cos/sin
    assert all(torch.equal(a, b) for a, b in zip(first, RotaryEmbedding(RopeConfig(theta=1e4), 32)(pos, q, k)))
    pos.add_(3)
    rope.prepare(pos, q.dtype)  # next step (even the same tensor, changed in place): recomputed
    fresh = RotaryEmbedding(RopeConfig(theta=1e4), 32)(torch.arange(3, 8), q, k)
    assert all(torch.equal(a, b) for a, b in zip(rope(pos, q, k), fresh))
    with torch.inference_mode():  # the engine's mode: no version counters involved
        rope.prepare(torch.arange(4), q.dtype)
        rope(torch.arange(4), q[:4], k[:4])
