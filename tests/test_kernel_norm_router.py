"""Post-attention add+RMSNorm + router GEMV + routing in one launch (`qwen3coder.kernels.norm_router`).

Against the unfused kernels and the PyTorch reference: the new residual bitwise equal to
`fused_add_rmsnorm`'s, the normed rows within one ulp of it (the variance is summed in the kernel's own
order), the logits within the bound of an fp32 dot product rounded once, and the routing exactly
`route` + `moe_align` applied to the returned logits; the arrival counter is back at 0 after every
launch. CPU: Triton's interpreter; GPU (`-m gpu`): compiled, bf16, at the 30B-A3B shapes, also
through a SparseMoeBlock and a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import qwen3coder.kernels.norm_router as nr  # noqa: E402
from qwen3coder.kernels.fused_moe import moe_align  # noqa: E402
from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm  # noqa: E402
from qwen3coder.models.layers.moe import route  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the last place of a's dtype at max(|a|, |b|)."""
    finfo = torch.finfo(a.dtype)
    larger = torch.maximum(a.float().abs(), b.float().abs()).clamp_min(finfo.tiny)
    _, e = torch.frexp(larger)
    ulp = torch.ldexp(torch.ones_like(larger), e - 1) * finfo.eps
    return ((a.float() - b.float()).abs() / ulp).max().item()


def _case(n: int, hidden: int, experts: int, partials: int, part_dtype: torch.dtype, dtype: torch.dtype,
          seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (n, partials, hidden) if partials else (n, hidden)
    x = (torch.randn(shape, generator=g) * 0.5).to(DEV, part_dtype if partials else dtype)
    residual = torch.randn(n, hidden, generator=g).to(DEV, dtype)
    norm_w = (1 + 0.2 * torch.randn(hidden, generator=g)).to(DEV, dtype)
    router_w = (torch.randn(experts, hidden, generator=g) * hidden ** -0.5).to(DEV, dtype)
    return x, residual, norm_w, router_w


def _check(x, residual, norm_w, router_w, top_k, norm_topk, zero_centered, block_m=16):
    normed, new_res, logits, r = nr.fused_norm_router_route(x, residual, norm_w, 1e-6, zero_centered, router_w,
                                                            top_k, norm_topk, block_m)
    ref_normed, ref_res = fused_add_rmsnorm(x, residual, norm_w, 1e-6, zero_centered)
    assert torch.equal(new_res, ref_res)
    assert _ulps(normed, ref_normed) <= 1
    exact = normed.double() @ router_w.double().t()
    mag = normed.double().abs() @ router_w.double().abs().t()
    bound = (router_w.shape[1] + 2) * 2.0 ** -24 * mag + 0.5 * (exact.abs() * torch.finfo(logits.dtype).eps * 2)
    assert ((logits.double() - exact).abs() <= bound + 1e-30).all()
    # the documented tie rule (bf16 logits tie often): descending, the lowest expert index first
    ids = torch.sort(logits.float(), dim=1, descending=True, stable=True).indices[:, :top_k]
    probs = torch.softmax(logits.float(), dim=1).gather(1, ids)
    if norm_topk:
        probs = probs / probs.sum(dim=1, keepdim=True)
    assert torch.equal(r.topk_ids.long(), ids)
    assert (r.topk_weights.float() - probs).abs().max().item() <= 2 * torch.finfo(logits.dtype).eps
    if not (logits.float().unsqueeze(2) == logits.float().unsqueeze(1)).sum().item() > logits.numel():
        assert torch.equal(route(logits, top_k, norm_topk, logits.dtype)[1], ids)  # no ties: `route` itself
    sorted_ids, block_expert = moe_align(ids, router_w.shape[0], block_m)
    assert torch.equal(r.sorted_ids.long(), sorted_ids) and torch.equal(r.block_expert.long(), block_expert)
    assert nr._arrival_counter(residual.device).item() == 0
    return normed, new_res, logits, r


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("partials, part_dtype", [(0, None), (4, torch.float32), (3, torch.bfloat16)],
                         ids=["row", "splitk-fp32", "topk-bf16"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_matches_unfused(n, partials, part_dtype, zero_centered):
    """bf16 rows (or partials) of H = 256, 40 experts in programs of BLOCK_E = 64 (the last one
    partial), top-4 renormalised."""
    x, residual, norm_w, router_w = _case(n, 256, 40, partials, part_dtype, torch.bfloat16, seed=n + partials)
    _check(x, residual, norm_w, router_w, 4, True, zero_centered)


@pytest.mark.parametrize("rows", [2, 3])  # the small-batch tile, the general one
def test_several_programs_and_repeat_launches(monkeypatch, rows):
    """Many programs (small router tiles): the last to arrive routes; the counter resets each time."""
    monkeypatch.setattr(nr, "ROUTER_TILE_SMALL", 2 * 128)  # BLOCK_E = 2 at H = 128: 13 programs for 25 experts
    monkeypatch.setattr(nr, "ROUTER_TILE", 4 * 128)  # BLOCK_E = 4: 7 programs
    x, residual, norm_w, router_w = _case(rows, 128, 25, 0, None, torch.bfloat16, seed=5)
    first = _check(x, residual, norm_w, router_w, 3, False, False, block_m=4)
    again = _check(x, residual, norm_w, router_w, 3, False, False, block_m=4)
    for a, b in zip(first[:3], again[:3]):
        assert torch.equal(a, b)


def test_router_tile_by_rows(monkeypatch):
    """Batches of up to SMALL_ROWS rows take ROUTER_TILE_SMALL (twice the programs at the 30B-A3B shape),
    larger ones ROUTER_TILE; a hidden size above the tile still gets one expert per program."""
    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(nr, "_norm_router_route_kernel", Spy())
    for rows, hidden in ((1, 2048), (2, 2048), (3, 2048), (16, 2048), (1, 16384)):
        x, residual, norm_w, router_w = _case(rows, hidden, 128, 0, None, torch.bfloat16, seed=1)
        nr.fused_norm_router_route(x, residual, norm_w, 1e-6, False, router_w, 8, True, 16)
    assert grids == [(32, 1), (32, 2), (16, 3), (16, 16), (128, 1)]


@pytest.mark.parametrize("n", [1, 3])
def test_without_alignment_same_routing(n):
    """`align=False` (the MoE GEMVs' routing): the same outputs, no alignment buffers."""
    x, residual, norm_w, router_w = _case(n, 256, 40, 0, None, torch.bfloat16, seed=11 + n)
    full = nr.fused_norm_router_route(x, residual, norm_w, 1e-6, False, router_w, 4, True, 16)
    bare = nr.fused_norm_router_route(x, residual, norm_w, 1e-6, False, router_w, 4, True, 16, align=False)
    for a, b in zip(full[:3] + full[3][:2], bare[:3] + bare[3][:2]):
        assert torch.equal(a, b)
    assert bare[3].sorted_ids is None and bare[3].block_expert is None
    assert nr._arrival_counter(residual.device).item() == 0


def _bf16_block(hidden_size: int, experts: int, top_k: int, inter: int, std: float, seed: int):
    """A bf16 SparseMoeBlock (normal weights of `std`, top-k sum folded), its post-attention norm and one
    row of hidden state and residual."""
    from qwen3coder.models.layers import moe as moe_mod
    from qwen3coder.models.layers.norms import RMSNorm

    torch.manual_seed(seed)
    block = moe_mod.SparseMoeBlock(hidden_size, experts, top_k, inter, True).to(DEV, torch.bfloat16)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=std)
    block.fold_topk_sum = True
    norm = RMSNorm(hidden_size).to(DEV, torch.bfloat16)
    hidden = torch.randn(1, hidden_size, device=DEV, dtype=torch.bfloat16)
    residual = torch.randn(1, hidden_size, device=DEV, dtype=torch.bfloat16)
    return block, norm, hidden, residual


def test_block_skips_alignment_for_moe_gemv(monkeypatch):
    """Rows that the MoE GEMVs take: `forward_with_norm` asks the fused launch for no alignment, with
    the same result as with it (bf16, the interpreter on the CPU)."""
    from qwen3coder.kernels import moe_gemv as mg
    from qwen3coder.kernels.gemv import GemvConfig
    from qwen3coder.models.layers import moe as moe_mod

    block, norm, hidden, residual = _bf16_block(64, 16, 4, 32, std=0.2, seed=2)
    monkeypatch.setattr(mg, "TUNED", {(1, 64, 32): mg.MoEGemvConfig(GemvConfig(1024, 4), GemvConfig(1024, 4))})
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(moe_mod, "FUSED_NORM_ROUTER", True)
    aligns = []
    real = nr.fused_norm_router_route
    monkeypatch.setattr(nr, "fused_norm_router_route", lambda *a, **k: aligns.append(k["align"]) or real(*a, **k))
    outs = []
    with torch.no_grad():
        for skip in (True, False):
            monkeypatch.setattr(moe_mod, "SKIP_ALIGN_FOR_GEMV", skip)
            out, res = block.forward_with_norm(hidden, residual, norm)
            outs.append((out.partials, res))
    assert aligns == [False, True]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_fits():
    assert nr.norm_router_fits(1, 2048, 128, 8) and nr.norm_router_fits(16, 2048, 128, 8)
    assert not nr.norm_router_fits(17, 2048, 128, 8)  # prefill-sized: the unfused kernels
    assert not nr.norm_router_fits(0, 2048, 128, 8)
    assert not nr.norm_router_fits(1, 32768, 128, 8)


def test_block_forward_with_norm_falls_back_off_the_triton_path():
    """On the CPU (no Triton path) `forward_with_norm` is exactly norm then forward."""
    from qwen3coder.models.layers import moe as moe_mod
    from qwen3coder.models.layers.norms import RMSNorm

    torch.manual_seed(0)
    block = moe_mod.SparseMoeBlock(64, 8, 2, 32, True)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    norm = RMSNorm(64)
    hidden, residual = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        out, new_res = block.forward_with_norm(hidden, residual, norm)
        x, ref_res = norm(hidden, residual)
        assert torch.equal(new_res, ref_res) and torch.equal(out, block(x))


def test_block_forward_with_norm_fused_path(monkeypatch):
    """The Triton path forced on (CPU: the interpreter, fp32): the fused entry and the unfused one give
    the same residual and, routing being the same, the same expert output to fp32 rounding."""
    from qwen3coder.models.layers import moe as moe_mod
    from qwen3coder.models.layers.norms import RMSNorm
    from qwen3coder.models.layers.partials import TopKPartials

    torch.manual_seed(1)
    block = moe_mod.SparseMoeBlock(64, 16, 4, 32, True).to(DEV)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.2)
    block.fold_topk_sum = True
    norm = RMSNorm(64).to(DEV)
    hidden, residual = torch.randn(3, 64, device=DEV), torch.randn(3, 64, device=DEV)
    calls = []
    real = nr.fused_norm_router_route
    monkeypatch.setattr(nr, "fused_norm_router_route", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    with torch.no_grad():
        x, ref_res = norm(hidden, residual)
        ref = block(x)
        monkeypatch.setattr(moe_mod, "FUSED_NORM_ROUTER", True)
        got, got_res = block.forward_with_norm(hidden, residual, norm)
    assert calls == [1] and isinstance(got, TopKPartials) and isinstance(ref, TopKPartials)
    assert torch.allclose(got_res, ref_res)
    assert torch.allclose(got.reduce(), ref.reduce(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_gpu_30b_shape(n):
    """The 30B-A3B shape (H 2048, 128 experts, top-8): o_proj split-K fp32 partials and MoE top-k
    partials as inputs."""
    for partials, part_dtype in ((4, torch.float32), (8, torch.bfloat16), (0, None)):
        x, residual, norm_w, router_w = _case(n, 2048, 128, partials, part_dtype, torch.bfloat16, seed=n)
        _check(x, residual, norm_w, router_w, 8, True, False)


@pytest.mark.gpu
def test_gpu_block_fused_vs_unfused_and_graph(monkeypatch):
    """A 30B-A3B-shaped SparseMoeBlock: fused and unfused `forward_with_norm` agree (the partials' sum
    within a few bf16 ulps of the output's scale: one-ulp logit differences may swap near-tied
    experts, which the comparison excludes by routing both from the same logits), and the fused path
    replays in a CUDA graph with the same result."""
    from qwen3coder.models.layers import moe as moe_mod

    block, norm, hidden, residual = _bf16_block(2048, 128, 8, 768, std=0.02, seed=0)
    with torch.no_grad():
        monkeypatch.setattr(moe_mod, "FUSED_NORM_ROUTER", False)
        ref, ref_res = block.forward_with_norm(hidden, residual, norm)
        monkeypatch.setattr(moe_mod, "FUSED_NORM_ROUTER", True)
        got, got_res = block.forward_with_norm(hidden, residual, norm)
        assert torch.equal(got_res, ref_res)
        a, b = got.reduce().float(), ref.reduce().float()
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_res = block.forward_with_norm(hidden, residual, norm)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(g_out.partials, got.partials) and torch.equal(g_res, got_res)
