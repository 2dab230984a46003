"""MoE routing + alignment in Triton (one launch for small batches, three tiled launches for large ones)
against `route` + `moe_align`.

CPU: Triton's interpreter (fp32); GPU (`-m gpu`): compiled, bf16 at the Qwen3-30B-A3B shape (up to 8192
tokens), and the whole SparseMoeBlock forward captured in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import qwen3coder.models.layers.moe as moe_mod  # noqa: E402
from qwen3coder.kernels.fused_moe import fused_moe, moe_align, moe_block_m  # noqa: E402
from qwen3coder.kernels.moe_routing import (  # noqa: E402
    fused_route_align, fused_routing_fits, tiled_route_align)
from qwen3coder.models.layers.moe import SparseMoeBlock, moe_forward_reference, route  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# compiled on a GPU, Triton's interpreter on CPU: `-m kernels` selects these on the GPU machine
pytestmark = pytest.mark.kernels
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
W_TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


def _logits(n: int, experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Router logits with distinct values per row (exact in bf16: multiples of 1/16 up to ±E/32)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(n, experts, generator=g).to(DEV)
    perm = torch.stack([torch.randperm(experts, generator=g) for _ in range(n)])
    return ((perm.float() - experts / 2) / 16).to(DEV, dtype)


def _check_parity(logits: torch.Tensor, top_k: int, norm: bool, block_m: int, out_dtype: torch.dtype,
                  fn=fused_route_align) -> None:
    r = fn(logits, top_k, norm, block_m, out_dtype)
    weights, ids = route(logits, top_k, norm, out_dtype)
    sorted_ids, block_expert = moe_align(ids, logits.shape[1], block_m)
    assert r.topk_ids.dtype == r.sorted_ids.dtype == r.block_expert.dtype == torch.int32
    assert torch.equal(r.topk_ids.long(), ids)
    assert torch.equal(r.sorted_ids.long(), sorted_ids)
    assert torch.equal(r.block_expert.long(), block_expert)
    assert r.topk_weights.dtype == out_dtype
    assert (r.topk_weights.float() - weights.float()).abs().max().item() <= W_TOL[out_dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, experts, top_k, block_m, norm", [
    (1, 128, 8, 16, True), (1, 8, 2, 16, False), (3, 128, 8, 16, False), (37, 16, 4, 16, True),
    (5, 8, 2, 4, True), (100, 128, 8, 64, False), (13, 60, 4, 16, True), (2, 8, 8, 16, True),
    (256, 8, 2, 16, True)])
def test_fused_route_align_matches_reference(dtype, n, experts, top_k, block_m, norm):
    _check_parity(_logits(n, experts, dtype, seed=n + experts), top_k, norm, block_m, dtype)


def test_ties_lowest_index_first():
    """Equal logits: descending value, the lowest expert index first (the documented tie rule); the
    weights equal `route`'s, and the alignment is `moe_align` of the ids returned."""
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0, 1.0, 0.0, 1.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                           [3.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, -1.0]], device=DEV)
    r = fused_route_align(logits, 4, True, 4, torch.float32)
    expected_ids = torch.sort(-logits.cpu(), dim=1, stable=True).indices[:, :4]
    assert torch.equal(r.topk_ids.cpu().long(), expected_ids)
    weights, _ = route(logits, 4, True, torch.float32)
    assert torch.allclose(r.topk_weights, weights, atol=1e-6)
    sorted_ids, block_expert = moe_align(r.topk_ids.long(), 8, 4)
    assert torch.equal(r.sorted_ids.long(), sorted_ids) and torch.equal(r.block_expert.long(), block_expert)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tiled", [False, True])
def test_signed_zeros_and_negatives(monkeypatch, packed, tiled):
    """-0.0 ties with +0.0 (lowest index first), negative logits order below them, -inf never wins over
    a finite logit; both top-k formulations (`PACKED_TOPK_MAX_ROWS`) and both routing paths agree with `route`."""
    import qwen3coder.kernels.moe_routing as mr

    monkeypatch.setattr(mr, "PACKED_TOPK_MAX_ROWS", 1 << 30 if packed else 0)
    rows = [[-0.0, 0.0, -1.5, -0.0, -3e30, 0.25, -0.25, 0.0],
            [-1.0, -2.0, -1.0, float("-inf"), -0.5, -7.0, -0.5, -1e-30],
            [1e30, -1e30, 5.0, 5.0, -0.0, 0.0, -5.0, 1e-30]]
    logits = torch.tensor(rows * (12 if tiled else 1), device=DEV)  # 36 rows: the tiled path's fits
    fn = mr.tiled_route_align if tiled else fused_route_align
    r = fn(logits, 4, True, 4, torch.float32)
    expected_ids = torch.sort(-logits.cpu(), dim=1, stable=True).indices[:, :4]
    assert torch.equal(r.topk_ids.cpu().long(), expected_ids)
    weights, _ = route(logits, 4, True, torch.float32)
    assert torch.allclose(r.topk_weights, weights, atol=1e-6)


@pytest.mark.parametrize("n, experts, top_k, block_m, norm", [
    (33, 8, 2, 16, True), (33, 128, 8, 64, False), (200, 128, 8, 64, True), (200, 60, 4, 16, False),
    (700, 128, 8, 16, True), (700, 16, 1, 64, False), (700, 128, 2, 64, True), (1, 128, 8, 16, True),
    (70, 512, 10, 16, True)])
def test_tiled_route_align_matches_reference(n, experts, top_k, block_m, norm):
    """The multi-program path: several tiles (32 tokens at E = 128, 8 at E = 512), a partial last
    tile, experts without tokens, runs spanning tiles, the tail past the last run."""
    _check_parity(_logits(n, experts, torch.float32, seed=n + experts + top_k), top_k, norm, block_m,
                  torch.float32, fn=tiled_route_align)


@pytest.mark.parametrize("n, experts, top_k, block_m", [(100, 16, 4, 16), (300, 8, 2, 4), (61, 128, 8, 64)])
def test_tiled_route_align_ties(n, experts, top_k, block_m):
    """Logits with many ties (a few integer values): ids in the documented order (descending, lowest
    index first), weights as `route`'s, the alignment `moe_align` of those ids, and where the batch
    also fits the one-program kernel, every output equal to that kernel's."""
    g = torch.Generator().manual_seed(n)
    logits = torch.randint(0, 4, (n, experts), generator=g).float().to(DEV)
    r = tiled_route_align(logits, top_k, True, block_m, torch.float32)
    expected_ids = torch.sort(-logits.cpu(), dim=1, stable=True).indices[:, :top_k]
    assert torch.equal(r.topk_ids.cpu().long(), expected_ids)
    weights, _ = route(logits, top_k, True, torch.float32)
    assert (r.topk_weights - weights).abs().max().item() <= 1e-6
    sorted_ids, block_expert = moe_align(r.topk_ids.long(), experts, block_m)
    assert torch.equal(r.sorted_ids.long(), sorted_ids) and torch.equal(r.block_expert.long(), block_expert)
    if fused_routing_fits(n, experts, top_k):
        one = fused_route_align(logits, top_k, True, block_m, torch.float32)
        for a, b in zip(r[1:], one[1:]):
            assert torch.equal(a, b)
        assert (r.topk_weights - one.topk_weights).abs().max().item() <= 1e-6


def test_fits_small_batches_only():
    assert fused_routing_fits(1, 128, 8) and fused_routing_fits(64, 128, 8) and fused_routing_fits(1024, 8, 2)
    assert not fused_routing_fits(512, 128, 8)  # 4096 pairs: the multi-kernel path
    assert not fused_routing_fits(256, 128, 8)  # a 256 x 128 tile is more than one program should hold


def _weights(experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5).to(DEV, dtype)
    return w13, w2


@pytest.mark.parametrize("n, experts, top_k", [(1, 8, 2), (7, 16, 4)])
def test_fused_moe_with_fused_routing(n, experts, top_k):
    hidden, inter = 64, 32
    w13, w2 = _weights(experts, hidden, inter, torch.float32, seed=n)
    x = torch.randn(n, hidden, generator=torch.Generator().manual_seed(1)).to(DEV)
    logits = _logits(n, experts, torch.float32, seed=2)
    block_m = moe_block_m(n * top_k, experts)
    r = fused_route_align(logits, top_k, True, block_m, torch.float32)
    got = fused_moe(x, w13, w2, r.topk_weights, r.topk_ids, block_m, r.sorted_ids, r.block_expert)
    weights, ids = route(logits, top_k, True, torch.float32)
    expected = moe_forward_reference(x, w13, w2, weights, ids)
    assert (got - expected).abs().max().item() <= 2e-5 * max(1.0, expected.abs().max().item())


def _block(hidden: int, experts: int, top_k: int, inter: int, dtype: torch.dtype, shared: int = 0) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(hidden, experts, top_k, inter, norm_topk_prob=True,
                           shared_expert_intermediate_size=shared)
    w13, w2 = _weights(experts, hidden, inter, torch.float32, seed=3)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(w13.cpu())
        block.experts.down_proj.copy_(w2.cpu())
    return block.to(DEV, dtype)


def _reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    weights, ids = route(block.gate(x), block.top_k, block.norm_topk_prob, x.dtype)
    out = moe_forward_reference(x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    if block.shared_expert is not None:
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out


@pytest.mark.parametrize("n, shared", [(1, 0), (5, 48)])
def test_sparse_moe_block_takes_fused_routing(monkeypatch, n, shared):
    """With the Triton path on (forced on CPU: the interpreter), the block routes through one fused
    kernel, matches the reference path and still keeps its router logits when asked; with
    `fused_routing = False` it takes `route` + `moe_align` instead."""
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    calls = []
    import qwen3coder.kernels.moe_routing as routing

    real = routing.fused_route_align
    monkeypatch.setattr(routing, "fused_route_align", lambda *a, **k: calls.append(a) or real(*a, **k))
    block = _block(64, 16, 4, 32, torch.float32, shared)
    block.keep_router_logits = True
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        got = block(x)
        expected = _reference(block, x)
        block.fused_routing = False
        unfused = block(x)
    assert len(calls) == 1
    assert block.router_logits is not None and block.router_logits.shape == (n, 16)
    tol = 2e-5 * max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tol and (unfused - expected).abs().max().item() <= tol


def test_sparse_moe_block_takes_tiled_routing(monkeypatch):
    """Past `fused_routing_fits` the Triton path routes through the tiled kernels (not `route`)."""
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    import qwen3coder.kernels.moe_routing as routing

    calls = []
    real = routing.tiled_route_align
    monkeypatch.setattr(routing, "tiled_route_align", lambda *a, **k: calls.append(a) or real(*a, **k))
    n, experts, top_k = 520, 16, 4
    assert not fused_routing_fits(n, experts, top_k)
    block = _block(64, experts, top_k, 32, torch.float32)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(6)).to(DEV)
    with torch.no_grad():
        got = block(x)
        expected = _reference(block, x)
    assert len(calls) == 1
    assert (got - expected).abs().max().item() <= 2e-5 * max(1.0, expected.abs().max().item())


# --- GPU: the Qwen3-30B-A3B shape in bf16 -------------------------------------------------------

H30, E30, K30, I30 = 2048, 128, 8, 768


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 8, 17, 32, 64, 128])
def test_gpu_route_align_30b_shape(n):
    logits = _logits(n, E30, torch.bfloat16, seed=n)
    _check_parity(logits, K30, True, moe_block_m(n * K30, E30), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [300, 1024, 8192])
def test_gpu_tiled_route_align_30b_shape(n):
    """Prefill sizes: the tiled path against `route` + `moe_align` (BLOCK_M 128 at 8192 tokens)."""
    logits = _logits(n, E30, torch.bfloat16, seed=n)
    _check_parity(logits, K30, True, moe_block_m(n * K30, E30), torch.bfloat16, fn=tiled_route_align)


@pytest.mark.gpu
def test_gpu_tiled_route_align_bf16_ties():
    """Router logits of a real GEMM in bf16 (ties within a row are common): ids in the documented tie
    order, weights as `route`'s, the alignment `moe_align` of those ids."""
    n = 8192
    x = torch.randn(n, H30, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(E30, H30, device=DEV, dtype=torch.bfloat16) * H30 ** -0.5
    logits = x @ w.t()
    bm = moe_block_m(n * K30, E30)
    r = tiled_route_align(logits, K30, True, bm, torch.bfloat16)
    expected_ids = torch.sort(-logits.float(), dim=1, stable=True).indices[:, :K30]
    assert torch.equal(r.topk_ids.long(), expected_ids)
    weights, _ = route(logits, K30, True, torch.bfloat16)
    assert (r.topk_weights.float() - weights.float()).abs().max().item() <= W_TOL[torch.bfloat16]
    sorted_ids, block_expert = moe_align(r.topk_ids.long(), E30, bm)
    assert torch.equal(r.sorted_ids.long(), sorted_ids) and torch.equal(r.block_expert.long(), block_expert)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 64, 1024])
def test_gpu_sparse_moe_block_30b_shape(n):
    block = _block(H30, E30, K30, I30, torch.bfloat16)
    x = torch.randn(n, H30, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        got = block(x).float()
        expected = _reference(block, x).float()
    assert (got - expected).abs().max().item() <= 3e-2 * max(1.0, expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 1024])
def test_gpu_sparse_moe_block_cuda_graph(n):
    """The whole block forward (router GEMM, fused routing, grouped GEMMs) captured and replayed."""
    block = _block(H30, E30, K30, I30, torch.bfloat16)
    static_x = torch.randn(n, H30, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile the kernels outside the capture
                block(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        for seed in range(3):
            x = torch.randn(n, H30, device=DEV, dtype=torch.bfloat16,
                            generator=torch.Generator(DEV).manual_seed(seed))
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, block(x))


def test_training_dispatch_accepts_fused_routing(monkeypatch):
    """A block whose experts carry a training dispatch (`install_moe_dispatch`) still runs when the
    fused routing hands them int32 ids and an alignment (no_grad on the Triton path: e.g. evaluation)."""
    from qwen3coder.train.model_utils import install_moe_dispatch

    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    block = _block(64, 8, 2, 32, torch.float32)
    install_moe_dispatch(block, "dense", torch.device(DEV), log=lambda *a: None)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad():
        got = block(x)
        expected = _reference(block, x)
    assert block.router_logits is not None  # install_moe_dispatch keeps them
    assert (got - expected).abs().max().item() <= 2e-5 * max(1.0, expected.abs().max().item())
