"""The skinny GEMM (`qwen3coder.kernels.skinny_gemm`) against its reference, and the `Linear` dispatch.

On the CPU the kernel runs in Triton's interpreter (conftest makes its bfloat16 casts and dots behave
as the GPU's) at small shapes; the real shapes and the comparison with cuBLAS run on the GPU (`gpu`).

Error bound. Kernel and reference multiply exactly in fp32 and accumulate in fp32 in different
orders, so their fp32 sums both lie within `(K + 2) · 2^-24 · (|x| @ |W|^T + |b|)` of the exact value
(the standard bound for an inner product of K terms plus a bias in any order, u = 2^-24; it also
covers the rounded products of fp32 inputs). The kernel then rounds once to
the output dtype (error <= half an ulp), so `|got - exact| <= 0.5 ulp(got) + (K + 2) 2^-24 Σ|x w|`,
checked against the exact sum in float64. For half-precision outputs the summation term is
thousands of times below half an ulp (unless cancellation leaves the output far below Σ|x w|), so
the kernel and the reference (itself rounded once) agree bit for bit except next to a rounding
boundary, where they differ by one ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import qwen3coder.kernels.skinny_gemm as sg  # noqa: E402
from qwen3coder.models.layers import linear as linear_mod  # noqa: E402
from qwen3coder.models.layers.linear import Linear  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_MIN_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |v| (float64)."""
    _, e = torch.frexp(v.double().abs().clamp_min(1e-30))
    return torch.pow(2.0, (e - 1).clamp_min(_MIN_EXP[dtype]).double() - _MANTISSA[dtype])


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """The bound of the module docstring, and agreement with the reference up to one ulp."""
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    exact = x.double() @ w.double().t()
    mag = x.double().abs() @ w.double().abs().t()
    if b is not None:
        exact, mag = exact + b.double(), mag + b.double().abs()
    k = x.shape[1]
    bound = (k + 2) * 2.0 ** -24 * mag  # covers fp32 products too (fp32 inputs)
    if x.dtype != torch.float32:
        bound = bound + 0.5 * _ulp(got, x.dtype)
    err = (got.double() - exact).abs()
    assert bool((err <= bound * 1.0001 + 1e-30).all()), f"max excess {(err - bound).max().item():.3g}"
    if x.dtype != torch.float32:
        _assert_within_one_ulp(got, sg.skinny_linear_reference(x, w, b), (k + 2) * 2.0 ** -24 * mag)


def _assert_within_one_ulp(got: torch.Tensor, ref: torch.Tensor, sum_err: torch.Tensor) -> None:
    """got and ref (both rounded once from fp32 sums of the same terms) differ by at most one ulp,
    plus twice the summation bound where cancellation leaves an output far below Σ|x w| (there an
    ulp is smaller than the fp32 sums' disagreement); and they differ only rarely (values next to a
    rounding boundary)."""
    diff = (got.double() - ref.double()).abs()
    ulp = _ulp(torch.maximum(got.double().abs(), ref.double().abs()), got.dtype)
    assert bool((diff <= ulp + 2 * sum_err).all()), f"max diff {diff.max().item():.3g}"
    assert (got != ref).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_default_config_matches_reference(dtype, m, bias):
    """The configuration `skinny_linear` picks itself; odd N, K not a multiple of the K block."""
    x, w, b = _case(m, 37, 80, dtype, bias, seed=m)
    _check(sg.skinny_linear(x, w, b), x, w, b)


CONFIGS = [
    sg.SkinnyConfig(block_n=16, block_k=32, split_k=1, dot=True),
    sg.SkinnyConfig(block_n=32, block_k=16, split_k=3, dot=True),  # 3 splits of unequal tails
    sg.SkinnyConfig(block_n=16, block_k=64, split_k=64, dot=True),  # capped at one K block per split
    sg.SkinnyConfig(block_n=4, block_k=32, split_k=1, dot=False),
    sg.SkinnyConfig(block_n=8, block_k=16, split_k=4, dot=False),
    sg.SkinnyConfig(block_n=2, block_k=64, split_k=2, dot=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
@pytest.mark.parametrize("m, n, k", [(1, 23, 144), (3, 19, 100), (4, 40, 64)])
def test_configs_match_reference(dtype, cfg, m, n, k):
    """Every inner product / tile / split-K choice computes the same function."""
    x, w, b = _case(m, n, k, dtype, bias=True, seed=n + k)
    _check(sg.skinny_linear(x, w, b, config=cfg), x, w, b)


def test_dot_path_beyond_sixteen_rows_and_3d_input():
    x, w, b = _case(20, 24, 48, torch.float16, bias=False)
    _check(sg.skinny_linear(x, w, b), x, w, b)
    got = sg.skinny_linear(x.view(4, 5, 48), w)
    assert got.shape == (4, 5, 24) and torch.equal(got.view(20, 24), sg.skinny_linear(x, w))


def test_strided_rows_and_empty_inputs():
    x, w, _ = _case(3, 16, 64, torch.float16, bias=False)
    wide = torch.zeros(3, 96, dtype=x.dtype, device=DEV)
    wide[:, :64] = x
    assert torch.equal(sg.skinny_linear(wide[:, :64], w), sg.skinny_linear(x, w))
    assert sg.skinny_linear(x[:0], w).shape == (0, 16)


def test_split_k_is_deterministic():
    x, w, b = _case(2, 33, 256, torch.bfloat16, bias=True)
    cfg = sg.SkinnyConfig(block_n=16, block_k=32, split_k=8)
    first = sg.skinny_linear(x, w, b, config=cfg)
    for _ in range(2):
        assert torch.equal(sg.skinny_linear(x, w, b, config=cfg), first)


def test_split_layout_has_no_empty_split():
    assert sg.split_layout(300, sg.SkinnyConfig(block_k=64, split_k=3)) == (3, 128)  # blocks 2 + 2 + 1
    assert sg.split_layout(256, sg.SkinnyConfig(block_k=64, split_k=3)) == (2, 128)  # 3 would leave one empty
    assert sg.split_layout(64, sg.SkinnyConfig(block_k=128, split_k=8)) == (1, 128)


# ------------------------------------------------------------------ policy and launch table
def test_use_skinny_policy(monkeypatch):
    """On CUDA only measured wins (`TUNED` entries that are not None) take the kernel; the interpreter
    (CPU tests) also takes shapes without an entry, through the default rule."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sg.use_skinny(1, 2048, 4096, torch.bfloat16, cuda)  # o_proj: tuned win
    assert sg.use_skinny(16, 128, 2048, torch.float16, cuda)  # router
    assert not sg.use_skinny(1, 5120, 2048, torch.bfloat16, cuda)  # qkv: cuBLAS measured faster
    assert not sg.use_skinny(1, 4096, 2048, torch.bfloat16, cuda)  # untuned shape: cuBLAS on a GPU
    assert sg.use_skinny(1, 4096, 2048, torch.bfloat16, cpu) == sg._INTERPRET  # ... the default rule here
    assert not sg.use_skinny(sg.SKINNY_MAX_M + 1, 2048, 4096, torch.bfloat16, cuda)
    assert sg.use_skinny(64, 2048, 4096, torch.bfloat16, cuda)  # o_proj at batch 64: tuned win
    assert not sg.use_skinny(64, 5120, 2048, torch.bfloat16, cuda)
    assert not sg.use_skinny(sg.INTERPRET_MAX_M + 1, 4096, 2048, torch.bfloat16, cpu)
    assert not sg.use_skinny(0, 2048, 4096, torch.bfloat16, cuda)
    assert not sg.use_skinny(1, 2048, 4096, torch.float32, cuda)
    assert not sg.use_skinny(1, 2048, 4088, torch.bfloat16, cuda)  # K not a multiple of 16
    monkeypatch.setitem(sg.TUNED, (2, 2048, 4096), None)  # mark a shape where cuBLAS wins
    assert not sg.use_skinny(2, 2048, 4096, torch.bfloat16, cuda)
    assert sg.use_skinny(1, 2048, 4096, torch.bfloat16, cuda)
    sg.set_skinny_enabled(False)
    try:
        assert not sg.use_skinny(1, 2048, 4096, torch.bfloat16, cuda)
    finally:
        sg.set_skinny_enabled(True)


def test_default_configs_at_the_30b_shapes():
    qkv, o, router, head = (sg.default_config(1, n, k) for n, k in
                            [(5120, 2048), (2048, 4096), (128, 2048), (151936, 2048)])
    assert (qkv.block_n, qkv.split_k) == (16, 1)  # 320 programs
    assert (o.block_n, o.split_k) == (16, 1)  # 128 programs of 4096-long rows
    assert router.block_n == 16 and router.split_k > 1  # 8 column tiles: split K
    assert head.block_n == 64 and head.split_k == 1
    cfg = sg.SkinnyConfig(block_n=32, split_k=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sg.TUNED, (4, 5120, 2048), cfg)
        assert sg.skinny_config(3, 5120, 2048) == cfg and sg.skinny_config(1, 5120, 2048) == qkv


# ------------------------------------------------------------------ the Linear dispatch
def test_linear_keeps_nn_linear_names_and_behaviour():
    lin = Linear(8, 4, bias=True)
    assert isinstance(lin, torch.nn.Linear)
    assert list(lin.state_dict()) == list(torch.nn.Linear(8, 4).state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_model_state_dict_names_unchanged():
    from qwen3coder.config import ModelConfig
    from qwen3coder.models import build_model

    for preset in ("tiny", "tiny-next"):
        with torch.device("meta"):
            model = build_model(ModelConfig.preset(preset))
        linears = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
        assert linears and all(type(model.get_submodule(n)) is Linear for n in linears)
        names = set(model.state_dict())
        assert {f"{n}.weight" for n in linears} <= names and "lm_head.weight" in names
        assert not any(".linear." in n for n in names)


def test_linear_dispatches_to_the_kernel(monkeypatch):
    """With the Triton path forced on (CPU: the interpreter), half-precision decode-sized inputs take
    `skinny_linear`; fp32, large batches, the switch off and scaled (FP8) layers take F.linear."""
    calls = []
    real = sg.skinny_linear
    monkeypatch.setattr(sg, "skinny_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
    lin = Linear(64, 24, bias=True).to(DEV, torch.float16)
    x = torch.randn(3, 64, device=DEV).half()
    _check(lin(x), x, lin.weight, lin.bias)
    assert calls == [(3, 64)]
    lin(torch.randn(sg.SKINNY_MAX_M + 1, 64, device=DEV).half())
    lin.float()(torch.randn(3, 64, device=DEV))
    assert len(calls) == 1
    lin.half()
    sg.set_skinny_enabled(False)
    try:
        lin(x)
    finally:
        sg.set_skinny_enabled(True)
    lin.weight_scale_inv = torch.ones(1, 1, device=DEV)
    lin(x)
    assert len(calls) == 1
    assert linear_mod.skinny_eligible(x, lin.weight, lin.bias)
    assert not linear_mod.skinny_eligible(x, lin.weight.to(torch.float8_e4m3fn), None)  # FP8 weight
    assert not linear_mod.skinny_eligible(x, lin.weight.t().contiguous().t(), None)  # K not unit-stride


@pytest.mark.parametrize("m", [1, 3])
def test_unreduced_split_partials_fold_into_the_norm(m):
    """`reduce=False`: the fp32 split partials [M, S, N]; summed in order and rounded once
    (`SplitKPartials.reduce`, or the fused add+RMSNorm kernel as it adds the residual) they give
    bitwise what the kernel's own reduction gives, and the norm's outputs are bitwise the unfused ones."""
    from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm
    from qwen3coder.models.layers.partials import SplitKPartials

    x, w, _ = _case(m, 48, 512, torch.bfloat16, bias=False, seed=m)
    cfg = sg.SkinnyConfig(block_n=16, block_k=64, split_k=4)
    part = sg.skinny_linear(x, w, config=cfg, reduce=False)
    assert part.shape == (m, 4, 48) and part.dtype == torch.float32
    reduced = sg.skinny_linear(x, w, config=cfg)
    assert torch.equal(SplitKPartials(part, x.dtype).reduce(), reduced)
    g = torch.Generator().manual_seed(m)
    residual = torch.randn(m, 48, generator=g).to(DEV, torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(48, generator=g)).to(DEV, torch.bfloat16)
    normed, new_residual = fused_add_rmsnorm(part, residual, weight, 1e-6)
    normed_ref, new_residual_ref = fused_add_rmsnorm(reduced, residual, weight, 1e-6)
    assert normed.dtype == new_residual.dtype == torch.bfloat16
    assert torch.equal(new_residual, new_residual_ref) and torch.equal(normed, normed_ref)
    unsplit = sg.skinny_linear(x, w, config=sg.SkinnyConfig(block_n=16, block_k=64, split_k=1), reduce=False)
    assert unsplit.shape == (m, 48) and unsplit.dtype == torch.bfloat16  # no split: the result itself


def test_linear_fold_split_k(monkeypatch):
    """A `Linear` with `fold_split_k` returns `SplitKPartials` where the kernel splits K (Triton path),
    which `RMSNorm(partials, residual)` takes; elsewhere (bias, CPU path) a plain tensor."""
    from qwen3coder.models.layers.norms import RMSNorm
    from qwen3coder.models.layers.partials import SplitKPartials

    lin = Linear(512, 48, bias=False).to(DEV, torch.bfloat16)
    lin.fold_split_k = True
    x = torch.randn(2, 512, device=DEV).to(torch.bfloat16)
    if not CUDA:
        assert isinstance(lin(x), torch.Tensor)  # not the Triton path on the CPU
    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(sg, "skinny_config", lambda m, n, k: sg.SkinnyConfig(block_n=16, block_k=64, split_k=4))
    monkeypatch.setattr(sg, "use_skinny", lambda *a: True)
    out = lin(x)
    assert isinstance(out, SplitKPartials) and out.partials.shape == (2, 4, 48)
    norm = RMSNorm(48).to(DEV, torch.bfloat16)
    residual = torch.randn(2, 48, device=DEV).to(torch.bfloat16)
    got = norm(out, residual)
    lin.fold_split_k = False
    want = norm(lin(x), residual)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
def test_model_forward_through_the_kernel(monkeypatch, preset):
    """Every linear of a bf16 model (attention, router, shared-expert gate, DeltaNet projections,
    LM head) takes the kernel for an 8-token input, and the logits match the F.linear forward: each
    projection agrees with F.linear to an ulp, so the logits differ by at most a few bf16 ulps."""
    from qwen3coder.config import ModelConfig
    from qwen3coder.loader import build_dummy_model

    model = build_dummy_model(ModelConfig.preset(preset), "cpu", torch.bfloat16, seed=0)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).float()
        calls = []
        real = sg.skinny_linear
        monkeypatch.setattr(sg, "skinny_linear",
                            lambda x, w, b=None, **kw: calls.append(w.shape) or real(x, w, b, **kw))
        monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
        got = model(ids).float()
    assert len(calls) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert (got - expected).abs().max().item() <= 2 ** -6 * expected.abs().max().item()


# ------------------------------------------------------------------ the benchmark script (CPU sanity)
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_skinny_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_skinny_gemm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_candidates_and_tuned_entries():
    bench = _bench_module()
    for n, k in bench.SHAPES.values():
        for m in bench.ROWS:
            cands = bench.candidates(m, n, k)
            assert cands[0] == sg.skinny_config(m, n, k) and len(set(cands)) == len(cands)
            assert any(not c.dot for c in cands) == (m <= sg.FMA_MAX_M)
    rows = [{"shape": "qkv", "m": m, "n": 5120, "k": 2048, "cublas": {"us": 8.0},
             "best": {"config": vars(sg.SkinnyConfig(block_n=32)), "us": us}}
            for m, us in [(1, 6.0), (3, 7.9), (4, 6.5), (128, 1.0)]]
    entries = bench.tuned_entries(rows)
    # M=3 and M=4 share the bucket 4: the larger decides; M=128 is beyond SKINNY_MAX_M
    assert entries == {(1, 5120, 2048): sg.SkinnyConfig(block_n=32), (4, 5120, 2048): sg.SkinnyConfig(block_n=32)}
    rows[2]["best"]["us"] = 7.9  # not 3% ahead of cuBLAS: None
    assert bench.tuned_entries(rows)[(4, 5120, 2048)] is None
    text = bench.format_tuned(bench.tuned_entries(rows), rows)
    namespace = {"SkinnyConfig": sg.SkinnyConfig}
    exec(text, namespace)  # pastes into skinny_gemm.py as it is
    assert namespace["TUNED"] == bench.tuned_entries(rows)


def test_bench_sweep_runs_on_cpu():
    """The sweep loop end to end on a small shape (interpreter, a stand-in timer): rows complete,
    the printed TUNED text parses."""
    bench = _bench_module()
    fake_us = iter(range(1000, 1, -1))

    def timer(fn, copies):
        fn(0)
        return float(next(fake_us))

    rows = bench.bench_shape("small", 40, 256, [1, 3], deadline=float("inf"), device=DEV, timer=timer)
    assert [r["m"] for r in rows] == [1, 3] and all(not r["failed"] for r in rows)
    assert all(r["tried"] == len(bench.candidates(r["m"], 40, 256)) for r in rows)
    entries = bench.tuned_entries(rows)
    assert set(entries) == {(1, 40, 256), (4, 40, 256)}  # the last candidate "wins" with this timer
    namespace = {"SkinnyConfig": sg.SkinnyConfig}
    exec(bench.format_tuned(entries, rows), namespace)
    assert namespace["TUNED"] == entries


def test_bench_candidates_compute_the_same_function():
    """Every launch configuration the sweep can time, at a small shape through the interpreter."""
    bench = _bench_module()
    seen = set()
    for m in (1, 3):  # BLOCK_M 1 and 4 (FMA), 16 (dot)
        x, w, _ = _case(m, 37, 512, torch.bfloat16, bias=False, seed=m)
        for cfg in bench.candidates(m, 128, 2048) + bench.candidates(m, 5120, 2048):
            if (cfg.block_m(m), cfg) not in seen:
                seen.add((cfg.block_m(m), cfg))
                _check(sg.skinny_linear(x, w, config=cfg), x, w, None)


# ------------------------------------------------------------------ GPU: real shapes vs cuBLAS
SHAPES_30B = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES_30B), ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_gpu_matches_cublas(shape, m, monkeypatch):
    """bf16 at the Qwen3-Coder-30B-A3B shapes: within the bound of exact, and within one ulp of
    cuBLAS (F.linear), which also accumulates in fp32 in another order (with its reduced-precision
    split-K reduction off: by default cuBLAS may round split-K partials to bf16)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    n, k = SHAPES_30B[shape]
    x, w, _ = _case(m, n, k, torch.bfloat16, bias=False, seed=m)
    got = sg.skinny_linear(x, w)
    _check(got, x, w, None)
    mag = x.double().abs() @ w.double().abs().t()
    _assert_within_one_ulp(got, F.linear(x, w), (k + 2) * 2.0 ** -24 * mag)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_is_deterministic():
    x, w, b = _case(4, 128, 2048, torch.bfloat16, bias=True)  # the router shape: split-K + reduction
    eager = sg.skinny_linear(x, w, b)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sg.skinny_linear(x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = sg.skinny_linear(x, w, b)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.gpu
def test_gpu_o_proj_split_k_folds_into_the_norm(monkeypatch):
    """At the 30B-A3B o_proj shape (tuned: split-K 4) a folding `Linear` returns `SplitKPartials` on
    the GPU, and post-attention norm outputs are bitwise those of the unfolded projection. (Batch 1
    normally takes the register-tile GEMV, `kernels.gemv`; it is switched off here.)"""
    from qwen3coder.kernels import gemv
    from qwen3coder.models.layers.norms import RMSNorm
    from qwen3coder.models.layers.partials import SplitKPartials

    monkeypatch.setattr(gemv, "TUNED", {})

    lin = Linear(4096, 2048, bias=False).to(DEV, torch.bfloat16)
    norm = RMSNorm(2048).to(DEV, torch.bfloat16)
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, 4096, device=DEV).to(torch.bfloat16)
        residual = torch.randn(m, 2048, device=DEV).to(torch.bfloat16)
        with torch.no_grad():
            lin.fold_split_k = True
            out = lin(x)
            assert isinstance(out, SplitKPartials), m
            got = norm(out, residual)
            lin.fold_split_k = False
            want = norm(lin(x), residual)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
