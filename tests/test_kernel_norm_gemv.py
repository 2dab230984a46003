"""Register-tile GEMV with the add+RMSNorm fused in front (`qwen3coder.kernels.norm_gemv`).

Against the unfused kernels and exact arithmetic: the new residual bitwise equal to
`fused_add_rmsnorm`'s; the output within the bound of an fp32 dot product rounded once (plain GEMV,
and fp32 activations), and in bf16 with the norm additionally within one bf16 ulp of the normed input
per element (the variance is summed in the kernel's own order). Through the model: a decoder layer
whose qkv shape is listed takes the fused path and gives the logits of the unfused one. CPU: Triton's
interpreter; GPU (`-m gpu`): compiled, bf16, at the 30B-A3B shapes, PDL on and off, in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import qwen3coder.kernels.norm_gemv as ng  # noqa: E402
from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _case(m: int, n: int, k: int, partials: int, part_dtype, dtype, seed: int, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (m, partials, k) if partials else (m, k)
    x = (torch.randn(shape, generator=g) * 0.5).to(DEV, part_dtype if partials else dtype)
    residual = torch.randn(m, k, generator=g).to(DEV, dtype)
    norm_w = (1 + 0.2 * torch.randn(k, generator=g)).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return x, residual, norm_w, w, b


def _within(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b, normed_ulps: float) -> None:
    """|got - exact(x w^T + b)| <= fp32-sum bound + half an output ulp (+ `normed_ulps` ulps of every
    input element, for an input that may differ from `x` by that much)."""
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    mag = x.double().abs() @ w.double().abs().t()
    eps = torch.finfo(got.dtype).eps
    bound = (x.shape[1] + 2) * 2.0 ** -24 * mag + exact.abs() * eps + normed_ulps * torch.finfo(x.dtype).eps * mag
    bound = bound + (b.double().abs() * 2.0 ** -24 if b is not None else 0)
    assert ((got.double() - exact).abs() <= bound + 1e-30).all(), (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("partials, part_dtype", [(0, None), (4, torch.float32), (3, torch.bfloat16)],
                         ids=["row", "splitk-fp32", "topk-bf16"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_norm_gemv_matches_unfused(m, partials, part_dtype, zero_centered):
    """bf16, K = 192 (padded to 256), N = 40 in programs of BLOCK_N = 8 (the last one partial)."""
    x, residual, norm_w, w, b = _case(m, 40, 192, partials, part_dtype, torch.bfloat16, seed=m + partials, bias=True)
    out, new_res = ng.norm_gemv(x, residual, norm_w, 1e-6, zero_centered, w, b, ng.GemvConfig(w_tile=2048, num_warps=4))
    ref_normed, ref_res = fused_add_rmsnorm(x, residual, norm_w, 1e-6, zero_centered)
    assert torch.equal(new_res, ref_res)
    assert out.shape == (m, 40) and out.dtype == torch.bfloat16
    _within(out, ref_normed, w, b, normed_ulps=1)


@pytest.mark.parametrize("m", [1, 2])
def test_norm_gemv_fp32_is_an_fp32_dot_of_the_normed_row(m):
    """fp32 activations: the normed row equals the norm kernel's to fp32 rounding, so the output is
    within the plain dot-product bound (a wrong row, scale or weight would be far outside it)."""
    x, residual, norm_w, w, _ = _case(m, 24, 64, 2, torch.float32, torch.float32, seed=7)
    out, new_res = ng.norm_gemv(x, residual, norm_w, 1e-6, False, w, None, ng.GemvConfig(w_tile=512, num_warps=2))
    ref_normed, ref_res = fused_add_rmsnorm(x, residual, norm_w, 1e-6, False)
    assert torch.equal(new_res, ref_res)
    _within(out, ref_normed, w, None, normed_ulps=2 ** -14)


def test_norm_without_residual():
    x, _, norm_w, w, _ = _case(2, 16, 64, 0, None, torch.bfloat16, seed=3)
    out, res = ng.norm_gemv(x, None, norm_w, 1e-6, False, w, None, ng.GemvConfig(w_tile=512, num_warps=2))
    assert res is None
    _within(out, fused_add_rmsnorm(x, None, norm_w, 1e-6, False), w, None, normed_ulps=1)


@pytest.mark.parametrize("m", [1, 4])
def test_plain_gemv(m):
    x, _, _, w, b = _case(m, 33, 128, 0, None, torch.bfloat16, seed=m, bias=True)
    out = ng.gemv(x, w, b, ng.GemvConfig(w_tile=1024, num_warps=4))
    _within(out, x, w, b, normed_ulps=0)
    assert torch.equal(out, ng.gemv(x, w, b, ng.GemvConfig(w_tile=1024, num_warps=4)))  # deterministic


def test_rejects_too_many_rows():
    x, residual, norm_w, w, _ = _case(ng.MAX_ROWS + 1, 8, 64, 0, None, torch.bfloat16, seed=0)
    with pytest.raises(AssertionError, match="rows"):
        ng.norm_gemv(x, residual, norm_w, 1e-6, False, w)


def test_policy(monkeypatch):
    dev = torch.device(DEV)
    monkeypatch.setattr(ng, "TUNED", {(5120, 2048): ng.GemvConfig()})
    assert ng.gemv_config(1, 5120, 2048, torch.bfloat16, dev) == ng.GemvConfig()
    assert ng.gemv_config(ng.MAX_ROWS, 5120, 2048, torch.float16, dev) is not None
    assert ng.gemv_config(ng.MAX_ROWS + 1, 5120, 2048, torch.bfloat16, dev) is None  # more rows: other paths
    assert ng.gemv_config(1, 2048, 4096, torch.bfloat16, dev) is None  # not listed
    assert ng.gemv_config(1, 5120, 2048, torch.float32, dev) is None
    assert ng.gemv_config(1, 5120, 2048, torch.bfloat16, torch.device("meta")) is None
    ng.set_gemv_enabled(False)
    try:
        assert ng.gemv_config(1, 5120, 2048, torch.bfloat16, dev) is None
    finally:
        ng.set_gemv_enabled(True)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_model_decode_through_the_fused_norm_qkv(monkeypatch, rows):
    """A tiny bf16 Qwen3-MoE with its qkv and o_proj shapes listed: for <= MAX_ROWS rows every layer
    after the first fuses its input norm into the qkv GEMV and o_proj takes the GEMV (8 rows: neither);
    the logits match the unlisted forward to a few bf16 ulps (each projection to an ulp)."""
    from qwen3coder.config import ModelConfig
    from qwen3coder.loader import build_dummy_model
    from qwen3coder.models.layers import attention as attn_mod
    from qwen3coder.models.layers import linear as linear_mod

    cfg = ModelConfig.preset("tiny")
    model = build_dummy_model(cfg, "cpu", torch.bfloat16, seed=0)
    ids = torch.randint(0, 512, (1, rows), generator=torch.Generator().manual_seed(rows))
    a = model.model.layers[0].self_attn
    qkv_shape, o_shape = tuple(a.qkv_proj.weight.shape), tuple(a.o_proj.weight.shape)
    with torch.no_grad():
        expected = model(ids).float()
        fused, plain = [], []
        real_norm_gemv, real_gemv = ng.norm_gemv, ng.gemv
        monkeypatch.setattr(ng, "norm_gemv", lambda *a, **k: fused.append(1) or real_norm_gemv(*a, **k))
        monkeypatch.setattr(ng, "gemv", lambda *a, **k: plain.append(1) or real_gemv(*a, **k))
        monkeypatch.setattr(ng, "TUNED", {qkv_shape: ng.GemvConfig(w_tile=4096, num_warps=4),
                                          o_shape: ng.GemvConfig(w_tile=4096, num_warps=4)})
        for mod in (attn_mod, linear_mod):
            monkeypatch.setattr(mod, "use_triton", lambda t: True)
        got = model(ids).float()
    layers = cfg.num_hidden_layers
    if rows <= ng.MAX_ROWS:
        assert len(fused) == layers - 1  # the first layer has no residual yet: norm, then qkv through gemv
        assert len(plain) == layers + 1
    else:
        assert fused == [] and plain == []
    assert (got - expected).abs().max().item() <= 2 ** -5 * expected.abs().max().item()


# ------------------------------------------------------------------ GPU
SHAPES_30B = {"qkv": (5120, 2048), "o_proj": (2048, 4096)}
CONFIGS = [ng.GemvConfig(16384, 8), ng.GemvConfig(8192, 4), ng.GemvConfig(16384, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_gpu_30b_shapes(m, cfg, monkeypatch):
    """bf16 at the 30B-A3B shapes: the qkv GEMV after the input norm of top-8 bf16 partials (and of
    fp32 split-K partials), within the bound of the unfused norm's output and within one ulp of cuBLAS
    on it where the normed rows agree; o_proj as a plain GEMV within the fp32-dot bound."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    n, k = SHAPES_30B["qkv"]
    for partials, part_dtype in ((8, torch.bfloat16), (4, torch.float32), (0, None)):
        x, residual, norm_w, w, _ = _case(m, n, k, partials, part_dtype, torch.bfloat16, seed=m + partials)
        out, new_res = ng.norm_gemv(x, residual, norm_w, 1e-6, False, w, None, cfg)
        ref_normed, ref_res = fused_add_rmsnorm(x, residual, norm_w, 1e-6, False)
        assert torch.equal(new_res, ref_res)
        _within(out, ref_normed, w, None, normed_ulps=1)
        cublas = F.linear(ref_normed, w)
        assert ((out.float() - cublas.float()).abs() <= torch.finfo(torch.bfloat16).eps * cublas.float().abs()
                + 1e-3).float().mean().item() > 0.99
    n, k = SHAPES_30B["o_proj"]
    x, _, _, w, _ = _case(m, n, k, 0, None, torch.bfloat16, seed=m)
    _within(ng.gemv(x, w, None, cfg), x, w, None, normed_ulps=0)


@pytest.mark.gpu
def test_gpu_graph_replay_and_pdl_are_bitwise_equal():
    """Eager, PDL off, and CUDA-graph replays give the same bits (no atomics: fixed summation order)."""
    from qwen3coder.kernels import pdl

    x, residual, norm_w, w, _ = _case(1, 5120, 2048, 8, torch.bfloat16, torch.bfloat16, seed=1)
    eager = ng.norm_gemv(x, residual, norm_w, 1e-6, False, w)
    pdl.set_pdl_enabled(False)
    try:
        off = ng.norm_gemv(x, residual, norm_w, 1e-6, False, w)
    finally:
        pdl.set_pdl_enabled(True)
    assert torch.equal(eager[0], off[0]) and torch.equal(eager[1], off[1])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ng.norm_gemv(x, residual, norm_w, 1e-6, False, w)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
