"""The varlen paged attention kernel (prefill, chunked prefill and decode rows in one launch) against
`paged_attention_reference` (GPU: compiled; CPU: Triton's interpreter), and the model path that uses it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwen3coder.kernels.paged_prefill import (build_tile_map, paged_attention_varlen, prefill_block_m,  # noqa: E402
                                              tile_map_size)
from qwen3coder.models.context import ForwardContext  # noqa: E402
from qwen3coder.models.layers.attention import paged_attention_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# compiled on a GPU, Triton's interpreter on CPU: `-m kernels` selects these on the GPU machine
pytestmark = pytest.mark.kernels
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
# fp32: IEEE dots, only the summation order differs; bf16: p is rounded to bf16 before PV (as flash
# attention does) and the output once, so a few bf16 ulps of values of magnitude ~1
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Random caches (each sequence on scattered blocks, tables -1 padded) and queries."""
    g = torch.Generator().manual_seed(seed)
    tables, nxt = [], 1
    for n in seq_lens:
        blocks = (n + block_size - 1) // block_size
        tables.append([nxt + 2 * i for i in range(blocks)])
        nxt += 2 * blocks + 1
    k_cache = torch.randn(nxt + 1, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    v_cache = torch.randn(nxt + 1, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(DEV, dtype)
    ctx = ForwardContext.build(list(query_lens), list(seq_lens), tables, block_size, device=DEV)
    return q, k_cache, v_cache, ctx


CASES = [
    ([5], [5]),  # one short prompt
    ([70], [70]),  # crosses a 64-row query tile
    ([1, 1, 1], [1, 40, 130]),  # decode rows only
    ([33, 1, 100, 1], [33, 77, 164, 1]),  # prefill + decode mixed, a chunk after a 64-token context
    ([17, 64], [200, 64]),  # chunked prefill: 183 cached tokens before the chunk
    ([300, 1], [300, 9]),  # 128-row query tiles: whole tiles before the diagonal, then masked ones
    ([290], [420]),  # 128-row tiles of a chunk after 130 cached tokens
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens, seq_lens", CASES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 4, 32, 16), (8, 2, 64, 32), (6, 2, 16, 16)])
def test_varlen_matches_reference(dtype, query_lens, seq_lens, heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, ctx = _case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    got = paged_attention_varlen(q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, scale,
                                 max(query_lens)).float()
    assert (got - expected).abs().max().item() <= TOL[dtype]


def test_tile_map_lists_every_query_tile_then_padding():
    # sequence s, tile m -> s << 16 | m; 40 rows at 16 per tile: 3 tiles; the map padded with -1
    assert build_tile_map([40, 1, 16], 16, 8) == [0, 1, 2, 1 << 16, 2 << 16, -1, -1, -1]
    assert tile_map_size(57, 3, 16) == 4 + 3  # each sequence adds at most one partial tile
    assert build_tile_map([], 64, 2) == [-1, -1]
    with pytest.raises(AssertionError, match="do not fit"):
        build_tile_map([40], 16, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens, seq_lens", CASES)
@pytest.mark.parametrize("pad", [0, 13])
def test_varlen_tile_map_matches_reference(dtype, query_lens, seq_lens, pad):
    """The launch over a tile map (prefill CUDA graphs: the step padded to a token bucket, sequences to
    a fixed count, BLOCK_M the bucket's) equals the reference; padding rows come out zero."""
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 32
    q, k_cache, v_cache, ctx = _case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    n = q.shape[0]
    padded = torch.cat([q, torch.randn(pad, heads, head_dim, device=DEV).to(dtype)])
    block_m = prefill_block_m(n + pad)
    size = tile_map_size(n + pad, len(query_lens) + 3, block_m)
    tile_map = torch.tensor(build_tile_map(query_lens, block_m, size), dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    got = paged_attention_varlen(padded, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
                                 scale, 0, tile_map=tile_map, block_m=block_m).float()
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    assert (got[:n] - expected).abs().max().item() <= TOL[dtype]
    assert not got[n:].any()


LONG_CONTEXT = [([5], [300]), ([1, 16, 1], [700, 200, 3]), ([70, 2], [520, 130])]  # short chunks, long contexts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens, seq_lens", CASES + LONG_CONTEXT)
@pytest.mark.parametrize("num_splits", [3])
@pytest.mark.parametrize("tiled", [False, True], ids=["grid", "tile-map"])
def test_varlen_kv_splits_match_reference(dtype, query_lens, seq_lens, num_splits, tiled):
    """Keys split into runs of one 64-token tile per split (the floor lowered so that short contexts split
    too), partials merged by the second kernel: equal to the reference. Tiles whose keys fit one split
    are written directly; rows that see no key of a split (the diagonal split past them) weigh nothing."""
    heads, kv_heads, head_dim, block_size = 8, 2, 32, 16
    q, k_cache, v_cache, ctx = _case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=3)
    kw = dict(num_splits=num_splits, min_tiles=1)
    if tiled:
        block_m = prefill_block_m(q.shape[0])
        size = tile_map_size(q.shape[0], len(query_lens), block_m)
        kw.update(tile_map=torch.tensor(build_tile_map(query_lens, block_m, size), dtype=torch.int32, device=DEV),
                  block_m=block_m)
    scale = head_dim ** -0.5
    got = paged_attention_varlen(q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, scale,
                                 max(query_lens), **kw).float()
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    assert (got - expected).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("query_lens, seq_lens", [([300, 1], [300, 9]), ([290], [420]), ([130, 17], [700, 17])])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_varlen_128_key_tiles_match_reference(query_lens, seq_lens, num_splits):
    """128-key tiles (what long eager steps take, `prefill_block_n`): whole tiles, the diagonal, a chunk
    after cached keys, a decode row; unsplit and split in two."""
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 16
    q, k_cache, v_cache, ctx = _case(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, torch.float32,
                                     seed=4)
    scale = head_dim ** -0.5
    got = paged_attention_varlen(q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, scale,
                                 max(query_lens), num_splits=num_splits, min_tiles=1, block_n=128).float()
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    assert (got - expected).abs().max().item() <= TOL[torch.float32]


def test_prefill_block_n_rule():
    """128-key tiles only for long eager steps of 128-row query tiles in 16-bit caches; 32 above head_dim 128."""
    from qwen3coder.kernels.paged_prefill import LONG_KEYS, prefill_block_n, prefill_launch

    bf16 = torch.bfloat16
    assert prefill_block_n(128, 128, LONG_KEYS, bf16, tile_map=False) == 128
    assert prefill_block_n(128, 128, LONG_KEYS - 1, bf16, tile_map=False) == 64
    assert prefill_block_n(128, 128, None, bf16, tile_map=False) == 64
    assert prefill_block_n(128, 128, 32768, bf16, tile_map=True) == 64  # graphs keep their tiles
    assert prefill_block_n(128, 64, 32768, bf16, tile_map=False) == 64
    assert prefill_block_n(128, 128, 32768, torch.float32, tile_map=False) == 64
    assert prefill_block_n(256, 128, 32768, bf16, tile_map=False) == 32
    assert prefill_launch(128, 128) == (8, 3) and prefill_launch(128) == (8, 2) and prefill_launch(64) == (4, 2)


def test_prefill_splits_fill_the_gpu_only_when_few_tiles():
    from qwen3coder.kernels.paged_prefill import MAX_PREFILL_SPLITS, choose_prefill_splits

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    from qwen3coder.kernels.paged_attention import _num_sms

    target = 2 * _num_sms(dev)
    # one 16-row tile x 32 heads after a long context: as many splits as fill the GPU, at most the cap
    assert choose_prefill_splits(16, 32, 16, 64, 100_000, dev) == max(1, min(MAX_PREFILL_SPLITS, target // 32))
    assert choose_prefill_splits(16, 2, 16, 64, 100_000, dev) == min(MAX_PREFILL_SPLITS, target // 2)
    assert choose_prefill_splits(16, 32, 16, 64, 16, dev) == 1  # a fresh short prompt: nothing to split
    assert choose_prefill_splits(8192, 32, 128, 64, 100_000, dev) == 1  # many tiles already fill it


def test_model_prefill_uses_varlen_kernel(monkeypatch):
    """A tiny model's cached prefill + chunked prefill + decode logits with the Triton path forced on
    (through the interpreter on CPU) equal the reference path's."""
    import qwen3coder.kernels.paged_prefill as pp
    from qwen3coder.config import ModelConfig
    from qwen3coder.loader import build_dummy_model
    from qwen3coder.models.cache import allocate_kv_cache

    if DEV == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by tests/conftest.py)")
    cfg = ModelConfig.preset("tiny")
    model = build_dummy_model(cfg, device=DEV, dtype="float32", seed=0)
    calls = []
    real = pp.paged_attention_varlen

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def run(triton_on: bool) -> torch.Tensor:
        import qwen3coder.models.layers.attention as attn_mod

        monkeypatch.setattr(attn_mod, "use_triton", (lambda t: True) if triton_on else (lambda t: False))
        allocate_kv_cache(model, num_blocks=32, block_size=16, device=DEV, dtype=torch.float32)
        ids = torch.arange(3, 3 + 50, device=DEV) % cfg.vocab_size
        out = []
        with torch.no_grad():
            # prefill 30 tokens, then a 20-token chunk on top, then one decode token
            for q_len, seq_len in ((30, 30), (20, 50)):
                ctx = ForwardContext.build([q_len], [seq_len], [list(range(4))], 16, device=DEV)
                pos = torch.arange(seq_len - q_len, seq_len, device=DEV)
                out.append(model.forward_step(ids[seq_len - q_len:seq_len], pos, ctx))
        return torch.cat([o.float() for o in out])

    monkeypatch.setattr(pp, "paged_attention_varlen", spy)
    ref = run(False)
    assert not calls
    got = run(True)
    assert calls, "the varlen kernel was not used"
    assert (got - ref).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the GPU machine)")
@pytest.mark.parametrize("query_lens, seq_lens", [([2000, 700, 1, 1], [2000, 2200, 3000, 5]), ([16], [20000]),
                                                   ([100, 1], [9000, 300]), ([4500], [4500]), ([1000, 1], [9000, 40])],
                         ids=["mixed", "turn16", "turn100", "fresh4500", "chunk1000"])
def test_varlen_30b_shape_long(query_lens, seq_lens):
    """Qwen3-30B-A3B attention shape (32 query / 4 KV heads, head_dim 128, bf16, block 16): a 2,000-token
    prompt, a 700-token chunk after 1,500 cached tokens, and decode rows, in one launch; short chunks
    after long contexts, whose keys the host's split count (`max_seq_len`) spreads over KV splits; long
    steps on 128-key tiles (a fresh 4,500-token prompt, a 1,000-token chunk after 8,000 cached ones)."""
    from qwen3coder.kernels.paged_prefill import choose_prefill_splits

    q, k_cache, v_cache, ctx = _case(query_lens, seq_lens, 32, 4, 128, 16, torch.bfloat16, seed=5)
    expected = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), ctx, 128 ** -0.5)
    got = paged_attention_varlen(q, k_cache, v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
                                 128 ** -0.5, max(query_lens), max_seq_len=max(seq_lens)).float()
    if sum(query_lens) <= 128:
        assert choose_prefill_splits(sum(query_lens), 32, prefill_block_m(max(query_lens)), 64, max(seq_lens),
                                     q.device) > 1
    assert (got - expected).abs().max().item() <= TOL[torch.bfloat16]
