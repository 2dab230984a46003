"""Register-tile GEMV for decode rows (`qwen3coder.kernels.gemv`).

Against exact arithmetic: within the bound of an fp32 dot product rounded once (bias added in fp32),
deterministic, and through the model: a decoder whose o_proj shape is listed takes the kernel at
batch 1 (not above `MAX_ROWS`) and gives the logits of the skinny/cuBLAS path to a few bf16 ulps.
CPU: Triton's interpreter; GPU (`-m gpu`): compiled, bf16, at the 30B-A3B o_proj and qkv shapes,
against cuBLAS, with PDL on and off, in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import qwen3coder.kernels.gemv as gv  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _case(m: int, n: int, k: int, dtype, seed: int, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


def _within(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    """|got - exact(x w^T + b)| <= the fp32 dot-product bound + half an ulp of the output dtype."""
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    mag = x.double().abs() @ w.double().abs().t() + (b.double().abs() if b is not None else 0)
    bound = (x.shape[1] + 2) * 2.0 ** -24 * mag + exact.abs() * torch.finfo(got.dtype).eps
    assert ((got.double() - exact).abs() <= bound + 1e-30).all(), (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_exact(m, dtype, bias):
    """K = 192 (padded to 256), N = 41 in programs of BLOCK_N = 4 (the last one partial)."""
    x, w, b = _case(m, 41, 192, dtype, seed=m, bias=bias)
    cfg = gv.GemvConfig(w_tile=1024, num_warps=4)
    out = gv.gemv(x, w, b, cfg)
    assert out.shape == (m, 41) and out.dtype == dtype
    _within(out, x, w, b)
    assert torch.equal(out, gv.gemv(x, w, b, cfg))  # fixed summation order
    assert torch.equal(out[:1], gv.gemv(x[:1], w, b, cfg))  # rows independent of each other
    ref = gv.gemv_reference(x, w, b)
    assert ((out.float() - ref.float()).abs() <= torch.finfo(dtype).eps * ref.float().abs() + 1e-6).all()


def test_strided_rows():
    x, w, _ = _case(2, 16, 64, torch.bfloat16, seed=1)
    wide = torch.zeros(2, 128, dtype=x.dtype, device=DEV)
    wide[:, :64] = x
    assert torch.equal(gv.gemv(wide[:, :64], w), gv.gemv(x, w))


def test_rejects_bad_input():
    x, w, _ = _case(gv.MAX_ROWS + 1, 8, 64, torch.bfloat16, seed=0)
    with pytest.raises(AssertionError, match="rows"):
        gv.gemv(x, w)
    with pytest.raises(AssertionError):
        gv.gemv(x[:1], w.float())


def test_policy(monkeypatch):
    dev = torch.device(DEV)
    monkeypatch.setattr(gv, "TUNED", {(1, 2048, 4096): gv.GemvConfig()})
    assert gv.gemv_config(1, 2048, 4096, torch.bfloat16, dev) == gv.GemvConfig()
    assert gv.gemv_config(1, 2048, 4096, torch.float16, dev) is not None
    assert gv.gemv_config(2, 2048, 4096, torch.bfloat16, dev) is None  # rows bucket 2: not listed
    assert gv.gemv_config(gv.MAX_ROWS + 1, 2048, 4096, torch.bfloat16, dev) is None
    assert gv.gemv_config(1, 5120, 2048, torch.bfloat16, dev) is None
    assert gv.gemv_config(1, 2048, 4096, torch.float32, dev) is None
    assert gv.gemv_config(1, 2048, 4096, torch.bfloat16, torch.device("meta")) is None
    gv.set_gemv_enabled(False)
    try:
        assert gv.gemv_config(1, 2048, 4096, torch.bfloat16, dev) is None
    finally:
        gv.set_gemv_enabled(True)


def test_default_table_lists_the_30b_o_proj_at_batch_1():
    assert gv.TUNED.get((1, 2048, 4096)) is not None
    assert all(rows <= gv.MAX_ROWS for rows, _, _ in gv.TUNED)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_model_forward_through_the_gemv(monkeypatch, rows):
    """A tiny bf16 Qwen3-MoE with its o_proj shape listed for every rows bucket <= MAX_ROWS: each
    layer's o_proj takes the kernel for 1 and 3 rows (8: the skinny path), and the logits match the
    unlisted forward to a few bf16 ulps (each projection agrees to an ulp)."""
    from qwen3coder.config import ModelConfig
    from qwen3coder.loader import build_dummy_model
    from qwen3coder.models.layers import linear as linear_mod

    cfg = ModelConfig.preset("tiny")
    model = build_dummy_model(cfg, "cpu", torch.bfloat16, seed=0)
    ids = torch.randint(0, 512, (1, rows), generator=torch.Generator().manual_seed(rows))
    n, k = model.model.layers[0].self_attn.o_proj.weight.shape
    with torch.no_grad():
        monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
        expected = model(ids).float()
        calls = []
        real = gv.gemv
        monkeypatch.setattr(gv, "gemv", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
        monkeypatch.setattr(gv, "TUNED", {(r, n, k): gv.GemvConfig(1024, 4) for r in (1, 2, 4)})
        got = model(ids).float()
    if rows <= gv.MAX_ROWS:
        assert calls == [(n, k)] * cfg.num_hidden_layers
    else:
        assert calls == []
    assert (got - expected).abs().max().item() <= 2 ** -6 * expected.abs().max().item()


# ------------------------------------------------------------------ GPU
SHAPES_30B = {"o_proj": (2048, 4096), "qkv": (5120, 2048)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES_30B))
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("cfg", [gv.GemvConfig(8192, 4), gv.GemvConfig(4096, 4), gv.GemvConfig(16384, 8)], ids=str)
def test_gpu_30b_shapes(shape, m, cfg, monkeypatch):
    """bf16 at the 30B-A3B shapes: within the fp32-dot bound of exact, and within one ulp of cuBLAS
    (with its reduced-precision split-K reduction off)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    n, k = SHAPES_30B[shape]
    x, w, _ = _case(m, n, k, torch.bfloat16, seed=m)
    out = gv.gemv(x, w, None, cfg)
    _within(out, x, w, None)
    cublas = F.linear(x, w).float()
    mag = (x.double().abs() @ w.double().abs().t()).float()
    slack = torch.finfo(torch.bfloat16).eps * cublas.abs() + 2 * (k + 2) * 2.0 ** -24 * mag  # + both fp32 sums
    assert ((out.float() - cublas).abs() <= slack).all()


@pytest.mark.gpu
def test_gpu_graph_replay_and_pdl_are_bitwise_equal():
    """Eager, PDL off, and CUDA-graph replays give the same bits (fixed summation order, no atomics)."""
    from qwen3coder.kernels import pdl

    x, w, b = _case(1, 2048, 4096, torch.bfloat16, seed=1, bias=True)
    eager = gv.gemv(x, w, b)
    pdl.set_pdl_enabled(False)
    try:
        off = gv.gemv(x, w, b)
    finally:
        pdl.set_pdl_enabled(True)
    assert torch.equal(eager, off)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = gv.gemv(x, w, b)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
