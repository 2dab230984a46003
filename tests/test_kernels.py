"""Triton kernels against their PyTorch references (GPU: compiled; CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwen3coder.kernels.fused_moe import (GemmTiles, MoETiles, fused_moe, moe_align, moe_block_m,  # noqa: E402
                                          moe_tiles)
from qwen3coder.kernels.paged_attention import (MIN_TILES_PER_SPLIT, choose_num_splits,  # noqa: E402
                                                paged_attention_decode, splits_used)
from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm  # noqa: E402
from qwen3coder.models.context import ForwardContext  # noqa: E402
from qwen3coder.models.layers.attention import paged_attention_reference  # noqa: E402
from qwen3coder.models.layers.moe import moe_forward_reference, route  # noqa: E402
from qwen3coder.models.layers.norms import RMSNorm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# compiled on a GPU, Triton's interpreter on CPU: `-m kernels` selects these on the GPU machine
pytestmark = pytest.mark.kernels
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# Triton's CPU interpreter computes through numpy, which has no bfloat16: bf16 is checked on the GPU
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def test_moe_align_layout():
    ids = torch.tensor([[3, 1], [1, 0], [3, 3]], device=DEV)
    sorted_ids, block_expert = moe_align(ids, num_experts=5, block_m=4)
    num_pairs = ids.numel()
    assert sorted_ids.numel() % 4 == 0 and block_expert.numel() == sorted_ids.numel() // 4
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [r for r in sorted_ids[b * 4:(b + 1) * 4].tolist() if r < num_pairs]
        if e < 0:
            assert not rows
            continue
        assert all(ids.flatten()[r].item() == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(num_pairs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens, experts, top_k, hidden, inter", [(1, 8, 2, 64, 32), (37, 16, 4, 64, 96)])
def test_fused_moe_matches_reference(dtype, n_tokens, experts, top_k, hidden, inter):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, hidden, generator=g).to(DEV, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(DEV, dtype)
    logits = torch.randn(n_tokens, experts, generator=g).to(DEV, dtype)
    weights, ids = route(logits, top_k, True, dtype)
    expected = moe_forward_reference(x, w13, w2, weights, ids).float()
    got = fused_moe(x, w13, w2, weights, ids).float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= TOL[dtype] * max(1.0, scale)


def _tile_choices() -> list[MoETiles]:
    """Every configuration `moe_tiles` can return, plus small and large tiles, and grouped program orders
    (groups of 1, 2 and 4 of the test's 9 row blocks: the last group of 2 and of 4 partial)."""
    table = {moe_tiles(p, 128) for p in (1, 8, 64, 128, 512, 4096, 8192, 65536)}
    return sorted(table | {MoETiles(GemmTiles(16, 128, 4, 3), GemmTiles(32, 256, 4, 5)),
                           MoETiles(GemmTiles(128, 32, 8, 4), GemmTiles(128, 64, 8, 3)),
                           MoETiles(GemmTiles(16, 64, 4, 3, group_m=1), GemmTiles(32, 64, 4, 3, group_m=2)),
                           MoETiles(GemmTiles(32, 64, 4, 3, group_m=4), GemmTiles(64, 64, 4, 3, group_m=1)),
                           MoETiles(GemmTiles(64, 64, 4, 3, group_m=1, tma=True), GemmTiles(64, 32, 4, 3, tma=True))},
                  key=repr)


# TMA tiles of the down projection read the aligned activations' padding rows (uninitialised memory, NaN in
# the padding test) into rows whose outputs are never stored; the interpreter's numpy matmul warns about them.
PADDING_ROWS = pytest.mark.filterwarnings("ignore:.* encountered in matmul:RuntimeWarning")


@PADDING_ROWS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", _tile_choices(), ids=repr)
def test_fused_moe_tiles_match_reference(dtype, tiles):
    """Any launch configuration computes the same function (K not a multiple of BLOCK_K included)."""
    g = torch.Generator().manual_seed(1)
    n_tokens, experts, top_k, hidden, inter = 5, 8, 2, 320, 96
    x = torch.randn(n_tokens, hidden, generator=g).to(DEV, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(DEV, dtype)
    weights, ids = route(torch.randn(n_tokens, experts, generator=g).to(DEV, dtype), top_k, True, dtype)
    expected = moe_forward_reference(x, w13, w2, weights, ids).float()
    got = fused_moe(x, w13, w2, weights, ids, tiles=tiles).float()
    assert (got - expected).abs().max().item() <= TOL[dtype] * max(1.0, expected.abs().max().item())


def test_moe_tiers_follow_rows_per_expert():
    """BLOCK_M and tiles by the mean rows an expert gets: the 30B-A3B's 128 experts switch at 1,024 and
    8,192 pairs (128 / 1,024 tokens of top-8); Coder-Next's 512 experts at four times the pairs."""
    import qwen3coder.kernels.fused_moe as fm
    assert [moe_block_m(p, 128) for p in (8, 1024, 1025, 8192, 8193)] == [16, 16, 64, 64, 128]
    assert [moe_block_m(p, 512) for p in (4096, 4097, 32768, 32769)] == [16, 64, 64, 128]
    assert moe_tiles(32, 128) is fm._DECODE_TINY and moe_tiles(1024, 128) is fm._DECODE
    assert moe_tiles(1025, 128) is fm._MID and moe_tiles(8193, 128) is fm._PREFILL


def test_fit_tiles_to_shared_memory(monkeypatch):
    """On a device with 227 KB of shared memory per program (an H100/H200), the batch-1 gate_up tiles
    tuned for bf16 keep their 5 stages in bf16 and drop to 3 in fp32 (5 would need 360 KB); a K step
    too wide even for 2 stages is halved; off CUDA nothing is limited."""
    import qwen3coder.kernels.fused_moe as fm
    tiles = GemmTiles(64, 128, 8, 5)
    cpu = torch.device("cpu")
    assert fm.fit_tiles(tiles, 768, 2048, 16, torch.float32, 2, cpu) == tiles
    monkeypatch.setattr(fm, "_smem_limit", lambda device: 232448)
    assert fm.fit_tiles(tiles, 768, 2048, 16, torch.bfloat16, 2, cpu) == tiles
    assert fm.fit_tiles(tiles, 768, 2048, 16, torch.float32, 2, cpu) == GemmTiles(64, 128, 8, 3)
    assert fm.fit_tiles(GemmTiles(256, 512, 8, 3, group_m=4), 768, 2048, 128, torch.float32, 2, cpu) == \
        GemmTiles(256, 32, 8, 2, group_m=4)
    # TMA loads stay where the device has them (here Triton's interpreter) and are dropped elsewhere
    tma = GemmTiles(128, 64, 8, 4, group_m=1, tma=True)
    assert fm.fit_tiles(tma, 768, 2048, 128, torch.bfloat16, 2, cpu).tma == fm._tma_ok(cpu)
    monkeypatch.setattr(fm, "_tma_ok", lambda device: False)
    assert fm.fit_tiles(tma, 768, 2048, 128, torch.bfloat16, 2, cpu) == GemmTiles(128, 64, 8, 4, group_m=1)


@PADDING_ROWS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [False, True])
def test_fused_moe_aligned_activation_padding_unused(dtype, tma):
    """The SwiGLU output is kept in the aligned order: its padding rows are neither written nor used.
    Filled with NaN beforehand, they stay NaN, and the down projection (pointer loads mask them; TMA loads
    read them into rows whose outputs are never stored) gives the reference's output."""
    import qwen3coder.kernels.fused_moe as fm
    g = torch.Generator().manual_seed(2)
    n_tokens, experts, top_k, hidden, inter, block_m = 6, 4, 2, 64, 96, 16
    x = torch.randn(n_tokens, hidden, generator=g).to(DEV, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(DEV, dtype)
    weights, ids = route(torch.randn(n_tokens, experts, generator=g).to(DEV, dtype), top_k, True, dtype)
    sorted_ids, block_expert = fm.moe_align(ids, experts, block_m)
    pairs = n_tokens * top_k
    tiles = GemmTiles(32, 32, 4, 2, tma=tma)
    act = torch.full((sorted_ids.numel(), inter), float("nan"), dtype=dtype, device=DEV)
    fm.launch_gate_up(x, w13, act, sorted_ids, block_expert, top_k, block_m, tiles, pairs)
    padding = sorted_ids >= pairs
    assert padding.any() and act[padding].isnan().all() and not act[~padding].isnan().any()
    out = torch.empty(pairs, hidden, dtype=dtype, device=DEV)
    fm.launch_down(act, w2, out, sorted_ids, block_expert, weights.flatten().contiguous(), block_m, tiles)
    expected = moe_forward_reference(x, w13, w2, weights, ids).float()
    got = out.view(n_tokens, top_k, hidden).float().sum(dim=1)
    assert (got - expected).abs().max().item() <= TOL[dtype] * max(1.0, expected.abs().max().item())


@PADDING_ROWS
def test_fused_moe_tma_falls_back_to_pointer_loads():
    """TMA tiles on weights a descriptor cannot address (non-contiguous expert weights, a K whose rows are
    not 16-byte multiples) take the pointer loads instead, with the same result."""
    import qwen3coder.kernels.fused_moe as fm
    g = torch.Generator().manual_seed(3)
    tma = MoETiles(GemmTiles(32, 32, 4, 2, tma=True), GemmTiles(32, 32, 4, 2, tma=True))
    for hidden, inter, stride in ((64, 32, 2), (62, 36, 1)):
        experts, top_k, n_tokens = 4, 2, 5
        x = torch.randn(n_tokens, hidden, generator=g).to(DEV)
        w13 = (torch.randn(experts * stride, 2 * inter, hidden, generator=g) * 0.1).to(DEV)[::stride]
        w2 = (torch.randn(experts * stride, hidden, inter, generator=g) * 0.1).to(DEV)[::stride]
        weights, ids = route(torch.randn(n_tokens, experts, generator=g).to(DEV), top_k, True, torch.float32)
        # strided experts: not contiguous; fp32 rows of 62 elements: 248 bytes, not a multiple of 16
        assert fm._descriptor(w13, experts * 2 * inter, [32, 32], True) is None
        expected = moe_forward_reference(x, w13, w2, weights, ids).float()
        got = fused_moe(x, w13, w2, weights, ids, tiles=tma).float()
        assert (got - expected).abs().max().item() <= TOL[torch.float32] * max(1.0, expected.abs().max().item())


def _paged_case(seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=1, width=None):
    """Random caches with each sequence on non-contiguous blocks; tables -1 padded to `width` blocks."""
    g = torch.Generator().manual_seed(seed)
    tables, nxt = [], 1
    for n in seq_lens:
        blocks = (n + block_size - 1) // block_size
        tables.append([nxt + 2 * i for i in range(blocks)])  # non-contiguous blocks
        nxt += 2 * blocks
    if width is not None:
        tables = [t + [-1] * (width - len(t)) for t in tables]
    num_blocks = nxt + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEV, dtype)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g).to(DEV, dtype)
    ctx = ForwardContext.build([1] * len(seq_lens), seq_lens, tables, block_size, device=DEV)
    return q, k_cache, v_cache, ctx


# lengths: 1, around the 64-token tile and the block sizes, and long enough for several tiles per split
PAGED_LENS = [1, 17, 63, 64, 65, 200, 700]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 64])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size",
                         [(4, 4, 64, 16), (8, 1, 128, 32), (8, 2, 64, 32), (6, 2, 32, 16)])
def test_paged_decode_matches_reference(dtype, num_splits, heads, kv_heads, head_dim, block_size):
    """GQA groups 1, 8, 4 and 3 (padded to 16 rows); one split, uneven splits, mostly empty splits."""
    q, k_cache, v_cache, ctx = _paged_case(PAGED_LENS, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale).float()
    got = paged_attention_decode(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale,
                                 max_seq_len=max(PAGED_LENS) + 40, num_splits=num_splits).float()
    assert (got - expected).abs().max().item() <= TOL[dtype] * 4


@pytest.mark.parametrize("seq_lens", [[1], [130], [1000], [3, 129, 64]])
def test_paged_decode_large_bound(seq_lens):
    """The captured-graph situation: a bound far above the real lengths (the split count comes from
    it, the work from the real lengths) and block tables of the bound's width, -1 padded."""
    bound, block_size = 32768, 16
    q, k_cache, v_cache, ctx = _paged_case(seq_lens, 8, 1, 64, block_size, torch.float32, seed=3,
                                           width=bound // block_size)
    assert choose_num_splits(len(seq_lens), 1, bound, q.device) > 1
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, 0.125)
    for kwargs in (dict(max_seq_len=bound), {}):  # no bound: the table's capacity
        got = paged_attention_decode(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 0.125, **kwargs)
        assert (got - expected).abs().max().item() <= TOL[torch.float32] * 4


def test_paged_decode_num_splits_choice():
    cpu = torch.device("cpu")  # stand-in of 8 SMs
    assert choose_num_splits(1, 4, 32768, cpu) == 4  # ~2 programs per SM: 16 / 4 KV heads
    assert choose_num_splits(1, 1, 32768, cpu) == 16
    assert choose_num_splits(1, 1, 32768, cpu, programs_per_sm=4) == 32  # a denser fill on request
    assert choose_num_splits(1, 1, 100, cpu) == 2  # no more splits than 64-token tiles of the bound
    assert choose_num_splits(64, 4, 32768, cpu) == 1  # a large batch fills the GPU by itself


def test_paged_decode_splits_used():
    """The floor of tiles per split: `max(cdiv(tiles, S), min_tiles)` tiles a split, cdiv(tiles, that)
    splits in use (64-token tiles)."""
    assert [splits_used(n, 64, 1) for n in (1, 64, 65, 160, 2048)] == [1, 1, 2, 3, 32]  # no floor
    assert [splits_used(n, 64, 4) for n in (1, 160, 256, 257, 2048, 8192)] == [1, 1, 1, 2, 8, 32]
    assert splits_used(64 * 64 * 8, 64, 4) == 64  # long contexts: every split, 8 tiles each
    assert [splits_used(n, 3, 4) for n in (700, 2048)] == [3, 3]  # cdiv(tiles, S) above the floor
    assert splits_used(8192, 64, 10 ** 6) == 1
    assert splits_used(160, 64) == splits_used(160, 64, MIN_TILES_PER_SPLIT)
    assert [splits_used(n, 64, 1, 128) for n in (1, 128, 129, 160, 2048)] == [1, 1, 2, 2, 16]  # 128-token tiles


def test_paged_decode_tile_sets_the_split_arithmetic():
    """No more splits than tiles of the bound, whatever the tile; a tile that is no power of two is refused."""
    cpu = torch.device("cpu")
    assert choose_num_splits(1, 1, 100, cpu, tile=128) == 1
    assert choose_num_splits(1, 1, 1000, cpu, tile=128) == 8
    q, k_cache, v_cache, ctx = _paged_case([100], 4, 1, 64, 16, torch.float32, seed=2)
    with pytest.raises(AssertionError, match="tile"):
        paged_attention_decode(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 0.125, tile=96)


def _decode_nan_scratch(*args, **kwargs) -> torch.Tensor:
    """`paged_attention_decode` with its output and partial buffers NaN-filled instead of left
    uninitialised: an output row the kernels fail to write, a partial the merge reads that no split
    wrote, or a merge that overwrites a directly written output with unwritten partials all show."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
        return paged_attention_decode(*args, **kwargs)


# one to five 64-token tiles around the tile boundaries, and longer contexts
MIXED_LENS = [1, 63, 64, 65, 160, 256, 257, 700]


@pytest.mark.parametrize("min_tiles, num_splits, heads, kv_heads, head_dim, block_size, tile", [
    *[(mt, s, *shape, 64) for mt in (1, 2, 4, 1000) for s in (3, 64)
      for shape in ((8, 2, 64, 16), (8, 1, 128, 32), (6, 2, 32, 16))],
    *[(mt, s, 8, 2, 64, 16, 128) for mt in (1, 4) for s in (3, 64)],  # 128-token tiles (a sweep option)
])
def test_paged_decode_min_tiles(min_tiles, num_splits, heads, kv_heads, head_dim, block_size, tile):
    """A fixed split count (64: a captured graph's) and a floor of tiles per split, with 64-token tiles
    (and 128 on one shape): in one batch some sequences use a single split (their output written by the
    split kernel, the merge skipping them) and others several (merged). Rows of single-split sequences
    equal the `S == 1` path bitwise."""
    q, k_cache, v_cache, ctx = _paged_case(MIXED_LENS, heads, kv_heads, head_dim, block_size, torch.float32,
                                           seed=7, width=64)
    used = [splits_used(n, num_splits, min_tiles, tile) for n in MIXED_LENS]
    if num_splits == 64 and (min_tiles == 1 or (tile == 64 and min_tiles in (2, 4))):
        assert 1 in used and max(used) > 1  # a mixed batch
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale)
    args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale)
    got = _decode_nan_scratch(*args, num_splits=num_splits, min_tiles_per_split=min_tiles, tile=tile)
    assert not got.isnan().any()
    assert (got - expected).abs().max().item() <= TOL[torch.float32] * 4
    single = _decode_nan_scratch(*args, num_splits=1, tile=tile)
    one = torch.tensor(used, device=q.device) == 1
    assert torch.equal(got[one], single[one])


def test_paged_decode_merge_chunk(monkeypatch):
    """The merge kernel combines `merge_chunk(S)` partials per step with a running max: split counts
    rounded up to a power of two, at most MERGE_LOOP_CHUNK; any chunk gives the reference's output (the
    11 splits of a 700-token context: one step of 16, six of 2)."""
    import qwen3coder.kernels.paged_attention as pa

    assert [pa.merge_chunk(s) for s in (2, 3, 4, 5, 8, 16, 64)] == [2, 4, 4, 8, 8, 8, 8]
    q, k_cache, v_cache, ctx = _paged_case(MIXED_LENS, 8, 2, 64, 16, torch.float32, seed=11, width=64)
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, 0.125)
    args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 0.125)
    for chunk in (2, 16):
        monkeypatch.setattr(pa, "MERGE_LOOP_CHUNK", chunk)
        got = _decode_nan_scratch(*args, num_splits=64)
        assert not got.isnan().any()
        assert (got - expected).abs().max().item() <= TOL[torch.float32] * 4


@pytest.mark.parametrize("num_splits", [3, 64])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(8, 2, 64, 16), (6, 2, 32, 16), (4, 4, 64, 16)])
def test_paged_decode_last_split_merge(num_splits, heads, kv_heads, head_dim, block_size):
    """Splits merged by the last one to arrive (no merge launch): every row written (NaN-filled
    scratch), within fp32 rounding of the merge kernel's output (the same weights; sums in another
    order), single-split rows bitwise the same, and the arrival counters back at 0 for the next call."""
    from qwen3coder.kernels import paged_attention as pa

    q, k_cache, v_cache, ctx = _paged_case(MIXED_LENS, heads, kv_heads, head_dim, block_size, torch.float32,
                                           seed=11, width=64)
    scale = head_dim ** -0.5
    args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale)
    separate = _decode_nan_scratch(*args, num_splits=num_splits, last_split_merge=False)
    for _ in range(2):  # the counters reset: a second launch merges as well
        merged = _decode_nan_scratch(*args, num_splits=num_splits, last_split_merge=True)
        assert not merged.isnan().any()
        assert (merged - separate).abs().max().item() <= 1e-5
        counters = pa._COUNTERS[q.device]
        assert counters.abs().sum().item() == 0
    one = torch.tensor([splits_used(n, num_splits) == 1 for n in MIXED_LENS], device=q.device)
    assert torch.equal(merged[one], separate[one])
    expected = paged_attention_reference(q, k_cache, v_cache, ctx, scale)
    assert (merged - expected).abs().max().item() <= TOL[torch.float32] * 4


def test_paged_decode_last_split_merge_default(monkeypatch):
    """`last_split_merge=None` follows the module switch (off by default: not yet measured on a GPU)."""
    from qwen3coder.kernels import paged_attention as pa

    assert pa.LAST_SPLIT_MERGE is False
    q, k_cache, v_cache, ctx = _paged_case([700, 65], 8, 2, 64, 16, torch.float32, seed=12)
    args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 0.125)
    monkeypatch.setattr(pa, "LAST_SPLIT_MERGE", True)
    launches = []
    real = pa._paged_decode_merge_kernel
    monkeypatch.setattr(pa, "_paged_decode_merge_kernel", type("K", (), {
        "__getitem__": lambda self, grid: (launches.append(grid), real[grid])[1]})())
    merged = paged_attention_decode(*args, num_splits=8)
    assert launches == []  # no merge launch
    assert torch.equal(merged, paged_attention_decode(*args, num_splits=8, last_split_merge=True))
    paged_attention_decode(*args, num_splits=8, last_split_merge=False)
    assert len(launches) == 1


def test_paged_decode_min_tiles_default():
    """None takes the module default; a floor below 1 is clamped to 1 (no floor)."""
    q, k_cache, v_cache, ctx = _paged_case([160, 700], 4, 1, 64, 16, torch.float32, seed=8)
    args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, 0.125)
    default = paged_attention_decode(*args, num_splits=64)
    assert torch.equal(default, paged_attention_decode(*args, num_splits=64,
                                                       min_tiles_per_split=MIN_TILES_PER_SPLIT))
    assert torch.equal(paged_attention_decode(*args, num_splits=64, min_tiles_per_split=0),
                       paged_attention_decode(*args, num_splits=64, min_tiles_per_split=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("last_split_merge", [False, True])
def test_paged_decode_cuda_graph_30b_shape(last_split_merge):
    """Qwen3-30B-A3B attention (32 query / 4 KV heads, dim 128, bf16, block 16): captured once with a
    32768-token bound, replayed for several real lengths. Compared with the fp32 reference on the
    same bf16 inputs: the kernel rounds p to bf16 before the PV dot and the output to bf16, each a
    relative error <= 2^-9; outputs are softmax averages of N(0, 1) values (|out| <~ 4), so errors
    stay below ~1e-2 and 2e-2 leaves margin while catching any masking or merge bug (O(0.1-1)).
    Both merges: the merge kernel and the last split to arrive (whose counters must reset on every
    replay)."""
    heads, kv_heads, dim, bs, bound = 32, 4, 128, 16, 32768
    g = torch.Generator().manual_seed(4)
    width = bound // bs
    for batch in (1, 3):
        num_blocks = batch * width + 1
        k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g).to("cuda", torch.bfloat16)
        v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g).to("cuda", torch.bfloat16)
        perm = torch.randperm(num_blocks - 1, generator=g)[:batch * width] + 1
        tables = perm.view(batch, width).to("cuda", torch.int32)
        q = torch.zeros(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        lens = torch.ones(batch, device="cuda", dtype=torch.int32)
        scale = dim ** -0.5
        assert choose_num_splits(batch, kv_heads, bound, q.device) > 1

        def call():
            return paged_attention_decode(q, k_cache, v_cache, tables, lens, scale, max_seq_len=bound,
                                          last_split_merge=last_split_merge)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()  # compile + warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for n in (1, 64, 300, 4097, 20000, bound):
            real = [n] if batch == 1 else [n, 77, bound - 5]
            q.copy_(torch.randn(batch, heads, dim, generator=g).to("cuda", torch.bfloat16))
            lens.copy_(torch.tensor(real, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            ctx = ForwardContext.build([1] * batch, real, tables.tolist(), bs, device="cuda")
            expected = paged_attention_reference(q.float(), k_cache, v_cache, ctx, scale)
            err = (out.float() - expected).abs().max().item()
            assert err <= 2e-2, (batch, real, err)
            eager = call()
            assert torch.equal(eager, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_decode_min_tiles_cuda_bf16():
    """The 30B-A3B shape in bf16 with the split count of a graph captured for max_model_len 32832, for
    several floors of tiles per split (1: none; 10**6: one split always) and batches mixing single-
    and multi-split sequences; the tolerance is that of the graph test above. Single-split rows equal
    the `S == 1` path bitwise, and the output and partials are NaN-filled first (no unwritten row)."""
    heads, kv_heads, dim, bs, bound = 32, 4, 128, 16, 32832
    scale = dim ** -0.5
    for lens in ([160], [300, 1, 2048, 65], [1, 63, 64, 65, 160, 257, 300, 600, 2048, 8191]):
        q, k_cache, v_cache, ctx = _paged_case(lens, heads, kv_heads, dim, bs, torch.bfloat16, seed=9,
                                               width=-(-bound // bs))
        num_splits = choose_num_splits(len(lens), kv_heads, bound, q.device)
        assert num_splits > 1
        expected = paged_attention_reference(q.float(), k_cache, v_cache, ctx, scale)
        args = (q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale)
        single = paged_attention_decode(*args, num_splits=1)
        for min_tiles in (1, 2, 4, 8, 16, 10 ** 6):
            got = _decode_nan_scratch(*args, num_splits=num_splits, min_tiles_per_split=min_tiles)
            torch.cuda.synchronize()
            err = (got.float() - expected).abs().max().item()
            assert err <= 2e-2, (lens, min_tiles, err)
            one = torch.tensor([splits_used(n, num_splits, min_tiles) == 1 for n in lens], device="cuda")
            assert torch.equal(got[one], single[one]), (lens, min_tiles)


# the add+RMSNorm kernel only loads, casts and stores bf16 (arithmetic in fp32), which the interpreter
# runs faithfully (conftest.py: its float32 -> bfloat16 cast rounds to nearest even, as the GPU does)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_fused_add_rmsnorm_matches_reference(dtype, zero_centered):
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(96, 1e-6, zero_centered=zero_centered)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g) * 0.3 + (0.0 if zero_centered else 1.0))
    norm = norm.to(DEV, dtype)
    x = torch.randn(5, 96, generator=g).to(DEV, dtype)
    r = torch.randn(5, 96, generator=g).to(DEV, dtype)
    exp_out, exp_res = norm(x, r)
    out, res = fused_add_rmsnorm(x, r, norm.weight, 1e-6, zero_centered)
    assert torch.equal(res, exp_res)
    assert (out.float() - exp_out.float()).abs().max().item() <= TOL[dtype] * 4
    assert (fused_add_rmsnorm(x, None, norm.weight, 1e-6, zero_centered).float()
            - norm(x).float()).abs().max().item() <= TOL[dtype] * 4


def test_kernels_only_without_autograd():
    from qwen3coder.kernels import use_triton

    t = torch.zeros(2, device="meta")
    assert not use_triton(t)  # not CUDA
    if torch.cuda.is_available():
        c = torch.zeros(2, device="cuda")
        with torch.no_grad():
            assert use_triton(c)
        assert not use_triton(c)  # autograd on: training must take the differentiable path
