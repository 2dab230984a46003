"""The fused attention prologue (QK RMSNorm + RoPE + paged KV store) against the unfused layer path.

On the CPU the kernel runs in Triton's interpreter, in float32 and float16 (numpy has no bfloat16;
float16 rounds to nearest-even like the GPU, so it checks that the kernel repeats the reference's
roundings step by step); bfloat16 and the real shapes run on the GPU (`gpu` marker). The reference
is what `Qwen3Attention.forward` does without the kernel: `q_norm`/`k_norm` (RMSNorm modules),
`RotaryEmbedding`, `store_kv`. The two compute the same fp32 norm then round at the same points; only
the order of the sum of squares may differ, so outputs agree to one unit in the last place (ulp) of
the row's largest value, and for 16-bit types almost all elements agree exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import qwen3coder.kernels.qk_norm_rope as qk_norm_rope_mod  # noqa: E402
import qwen3coder.models.layers.attention as attention_mod  # noqa: E402
from qwen3coder.config import ModelConfig, RopeConfig  # noqa: E402
from qwen3coder.kernels.qk_norm_rope import QKRopeLaunch, fused_qk_norm_rope_store, launch_config  # noqa: E402
from qwen3coder.models import build_model  # noqa: E402
from qwen3coder.models.cache import allocate_kv_cache, allocate_state_cache  # noqa: E402
from qwen3coder.models.context import ForwardContext  # noqa: E402
from qwen3coder.models.layers.attention import Qwen3Attention, store_kv  # noqa: E402
from qwen3coder.models.layers.norms import RMSNorm  # noqa: E402
from qwen3coder.models.layers.rotary import RotaryEmbedding  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
YARN = RopeConfig(rope_type="yarn", theta=1e6, factor=4.0, original_max_position_embeddings=32)

# name: (q heads, kv heads, head_dim, rope, zero-centred norm, gated q layout)
CONFIGS = {
    "qwen3": (4, 2, 32, RopeConfig(theta=1e7), False, False),
    "qwen3-mqa-yarn": (4, 1, 16, YARN, False, False),
    "next": (4, 2, 32, RopeConfig(theta=5e6, partial_rotary_factor=0.25), True, True),
    # head_dim not a power of two (masked tile), half rotary
    "next-d48": (2, 1, 48, RopeConfig(theta=5e6, partial_rotary_factor=0.5), True, True),
}


def _setup(hq: int, hk: int, d: int, rope: RopeConfig, zero_centered: bool, gated: bool, n: int,
           dtype: torch.dtype, seed: int = 0, num_blocks: int | None = None, block_size: int = 4):
    """Random qkv projection output, norm weights, rotary, positions, caches and slots (every third
    -1; by default the cache has a few more slots than tokens, so some slots stay untouched)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = num_blocks or max(12, -(-n // block_size) + 4)
    q_size, kv = hq * d * (2 if gated else 1), hk * d
    qkv = (torch.randn(n, q_size + 2 * kv, generator=g) * 2.0).to(DEV, dtype)
    q_norm, k_norm = RMSNorm(d, 1e-6, zero_centered), RMSNorm(d, 1e-6, zero_centered)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(torch.randn(d, generator=g) * 0.3 + (0.0 if zero_centered else 1.0))
    q_norm, k_norm = q_norm.to(DEV, dtype), k_norm.to(DEV, dtype)
    rotary = RotaryEmbedding(rope, d)
    positions = torch.randint(0, 5000, (n,), generator=g).to(DEV)
    cache_shape = (num_blocks, block_size, hk, d)
    k_cache = torch.randn(cache_shape, generator=g).to(DEV, dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(DEV, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[1::3] = -1  # padding rows: nothing stored
    return qkv, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots.to(DEV)


def _split(qkv: torch.Tensor, hq: int, hk: int, d: int, gated: bool):
    """The strided q/k/v views `Qwen3Attention.forward` takes of the projection output."""
    n = qkv.shape[0]
    q_size, kv = hq * d * (2 if gated else 1), hk * d
    q, k, v = qkv.split([q_size, kv, kv], dim=-1)
    q = q.view(n, hq, 2 * d)[..., :d] if gated else q.view(n, hq, d)
    return q, k.view(n, hk, d), v.view(n, hk, d)


def _reference(q, k, v, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots):
    """The unfused path of `Qwen3Attention.forward` + `PagedAttention.forward`'s store."""
    qr, kr = rotary(positions, q_norm(q), k_norm(k))
    store_kv(kr, v, k_cache, v_cache, slots)
    return qr


def _fused(q, k, v, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots, launch=None):
    cos, sin = rotary.step_cos_sin(positions, q.dtype)
    return fused_qk_norm_rope_store(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, cos, sin,
                                    k_cache, v_cache, slots, zero_centered=q_norm.zero_centered,
                                    launch=launch)


def _assert_ulp_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """|got - expected| <= 1 ulp of each row's largest value (4 for fp32: a sum order changes a few
    low bits of the fp32 norm); 16-bit types must also agree exactly almost everywhere."""
    got, expected = got.float(), expected.float()
    row_max = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    ulps = 4 if dtype == torch.float32 else 1
    diff = (got - expected).abs()
    assert bool((diff <= ulps * torch.finfo(dtype).eps * row_max).all()), diff.max().item()
    if dtype != torch.float32:
        assert (diff == 0).float().mean().item() >= 0.98


def _launch_id(launch: QKRopeLaunch | None) -> str:
    return "auto" if launch is None else "t{}h{}k{}w{}".format(*launch)


def _check(name: str, n: int, dtype: torch.dtype, launch: QKRopeLaunch | None = None) -> None:
    """Fused (with `launch`, else the automatic tile) against the unfused path: q, both caches."""
    hq, hk, d, rope, zc, gated = CONFIGS[name]
    qkv, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots = _setup(hq, hk, d, rope, zc, gated, n, dtype)
    q, k, v = _split(qkv, hq, hk, d, gated)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = _reference(q, k, v, q_norm, k_norm, rotary, positions, k_ref, v_ref, slots)
    got = _fused(q, k, v, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots, launch)
    assert got.shape == (n, hq, d) and got.is_contiguous()
    _assert_ulp_close(got, expected, dtype)
    _assert_ulp_close(k_cache, k_ref, dtype)  # padding rows (-1) and unused slots left untouched
    assert torch.equal(v_cache, v_ref)


def test_launch_config_tiles():
    """Decode-sized steps keep a program per (token, head); prefill steps take ~4K-element tiles."""
    assert launch_config(1, 32, 4, 128) == (1, 1, 1, 1)
    assert launch_config(16, 32, 4, 128) == (1, 1, 1, 1)
    assert launch_config(17, 32, 4, 128) == (4, 1, 1, 1)
    assert launch_config(64, 32, 4, 128) == (4, 1, 1, 1)
    assert launch_config(100, 32, 4, 128) == (16, 2, 2, 8)
    assert launch_config(2048, 32, 4, 128) == (16, 2, 2, 8)
    assert launch_config(8192, 32, 4, 128) == (16, 2, 2, 8)
    assert launch_config(8192, 16, 2, 256) == (8, 2, 2, 8)  # Qwen3-Next: head_dim 256
    assert launch_config(100, 4, 1, 48) == (32, 2, 1, 8)  # head_dim 48: BLOCK_D 64; one KV head


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 17, 100])  # tiles of 1, 1, 4 (tail 1) and 16 tokens (tail 4)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_prologue_matches_unfused(name, n, dtype):
    _check(name, n, dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("launch", [QKRopeLaunch(2, 2, 2, 1), QKRopeLaunch(8, 4, 4, 4), QKRopeLaunch(4, 8, 2, 2),
                                    QKRopeLaunch(16, 2, 1, 2)], ids=_launch_id)
@pytest.mark.parametrize("name", ["qwen3", "next-d48"])
def test_fused_prologue_head_groups(name, launch, dtype):
    """Explicit tiles, prefill's head groups among them, at a token count none divides: masked tail
    tiles and head groups past Hq / Hk (`next-d48` has 2 query heads and 1 KV head)."""
    _check(name, 37, dtype, launch)


# ------------------------------------------------------------------ the model with the fused path


@torch.no_grad()
def _tiny_model(next_: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The `tiny` / `tiny-next` preset with random weights (norm weights away from their init)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny-next" if next_ else "tiny"))
    for p in model.parameters():
        if p.dim() == 1:  # norms (and DeltaNet's A_log / dt_bias): positive, not all one
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.1)
    return model.to(DEV, dtype).eval()


@torch.no_grad()
def _decode_logits(model, prompts: list[list[int]], steps: int, fused: bool, monkeypatch,
                   block_size: int = 4) -> list[torch.Tensor]:
    """Cached prefill of `prompts`, then `steps` decode steps on fixed tokens; logits of every step."""
    monkeypatch.setattr(Qwen3Attention, "fused_prologue", fused)
    n = len(prompts)
    blocks_per_seq = (max(map(len, prompts)) + steps + block_size - 1) // block_size
    dtype = next(model.parameters()).dtype
    allocate_kv_cache(model, n * blocks_per_seq + 1, block_size, dtype, DEV)
    allocate_state_cache(model, n, dtype, DEV)
    tables = [[1 + s + i * n for i in range(blocks_per_seq)] for s in range(n)]  # interleaved blocks
    g = torch.Generator().manual_seed(7)
    feed = torch.randint(0, model.config.vocab_size, (steps, n), generator=g).tolist()
    lens = [len(p) for p in prompts]
    ctx = ForwardContext.build(lens, lens, tables, block_size, state_indices=list(range(n)),
                               has_initial_state=[False] * n, device=DEV)
    ids = torch.tensor([t for p in prompts for t in p], device=DEV)
    pos = torch.tensor([i for p in prompts for i in range(len(p))], device=DEV)
    out = [model.compute_logits(model.forward_step(ids, pos, ctx)[ctx.logits_indices]).cpu()]
    for step in range(steps):
        ctx = ForwardContext.build([1] * n, [x + 1 for x in lens], tables, block_size,
                                   state_indices=list(range(n)), has_initial_state=[True] * n, device=DEV)
        ids = torch.tensor(feed[step], device=DEV)
        pos = torch.tensor(lens, device=DEV)
        out.append(model.compute_logits(model.forward_step(ids, pos, ctx)[ctx.logits_indices]).cpu())
        lens = [x + 1 for x in lens]
    return out


@pytest.mark.parametrize("fold", [False, True], ids=["own-kernel", "folded"])
@pytest.mark.parametrize("next_", [False, True], ids=["qwen3-moe", "qwen3-next"])
def test_model_decode_with_fused_prologue(next_, fold, monkeypatch):
    """A tiny model's prefill + decode logits: fused prologue == unfused path (fp32). On the CPU the
    attention module is told to take its Triton path (interpreter) for both runs, so the runs differ
    only in the prologue; on the GPU both take it anyway. Decode steps run the prologue in its own
    kernel (the default), or folded into decode attention (`FOLD_DECODE_PROLOGUE`)."""
    monkeypatch.setattr(attention_mod, "FOLD_DECODE_PROLOGUE", fold)
    if not CUDA:
        monkeypatch.setattr(attention_mod, "use_triton", lambda t: not torch.is_grad_enabled())
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return fused_qk_norm_rope_store(*args, **kwargs)

    monkeypatch.setattr(qk_norm_rope_mod, "fused_qk_norm_rope_store", counted)
    model = _tiny_model(next_, torch.float32)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6]]
    expected = _decode_logits(model, prompts, 3, False, monkeypatch)
    assert not calls
    got = _decode_logits(model, prompts, 3, True, monkeypatch)
    n_attn = len(model.config.attention_layer_ids)
    # prefill (7 + 3 tokens), then 3 decode steps (folded: in the attention kernel)
    assert calls == [10] * n_attn + ([] if fold else [2] * (3 * n_attn))
    for e, g in zip(expected, got):
        assert torch.isfinite(e).all()
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ GPU: real shapes in bfloat16


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("n,launch", [(1, None), (8, None), (64, None), (333, None), (4099, None),
                                      (333, QKRopeLaunch(1, 1, 1, 4)), (333, QKRopeLaunch(64, 1, 1, 8)),
                                      (333, QKRopeLaunch(16, 2, 2, 8)), (333, QKRopeLaunch(2, 8, 4, 8))],
                         ids=lambda x: _launch_id(x) if x is None or isinstance(x, tuple) else str(x))
@pytest.mark.parametrize("shape", ["30b-a3b", "next-80b-a3b"])
def test_fused_prologue_real_shapes_bf16(shape, n, launch):
    """Qwen3-Coder-30B-A3B (32/4 heads, head_dim 128, full rotary) and Qwen3-Coder-Next (16/2 heads,
    head_dim 256, rotary 64, gated q, zero-centred norm) in bfloat16 on the GPU: decode and prefill
    token counts (tail tiles), the automatic tile and a few explicit ones."""
    cfg = ModelConfig.preset(shape)
    gated = zc = cfg.model_type == "qwen3_next"
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots = _setup(
        hq, hk, d, cfg.rope, zc, gated, n, torch.bfloat16, block_size=16)
    q, k, v = _split(qkv, hq, hk, d, gated)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = _reference(q, k, v, q_norm, k_norm, rotary, positions, k_ref, v_ref, slots)
    got = _fused(q, k, v, q_norm, k_norm, rotary, positions, k_cache, v_cache, slots, launch)
    _assert_ulp_close(got, expected, torch.bfloat16)
    _assert_ulp_close(k_cache, k_ref, torch.bfloat16)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("next_", [False, True], ids=["qwen3-moe", "qwen3-next"])
def test_model_decode_with_fused_prologue_bf16(next_, monkeypatch):
    """bf16 on the GPU: the fused prologue rounds where the unfused path rounds, so logits agree
    (a dense tolerance: MoE routing could flip on a one-ulp difference, which it should not here)."""
    model = _tiny_model(next_, torch.bfloat16)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6]]
    expected = _decode_logits(model, prompts, 3, False, monkeypatch)
    got = _decode_logits(model, prompts, 3, True, monkeypatch)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.float(), e.float(), atol=2e-2, rtol=2e-2)
