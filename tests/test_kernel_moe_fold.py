"""The MoE top-k sum folded into the next fused add+RMSNorm.

`fused_moe(reduce=False)` hands the weighted per-expert partials [N, K, H] to `fused_add_rmsnorm`,
which sums them in fp32, rounds once to the activation dtype (torch's `.sum(dim=1)`), then adds the
residual and normalises. CPU: Triton's interpreter (its float32 -> bfloat16 cast made to round to
nearest even, as the GPU does, in conftest.py); GPU (`-m gpu`): compiled, bf16.

On summation order: the kernel adds the partials in order k = 0, 1, ..., K-1; torch's `.sum(dim=1)`
may group them differently (CPU: vectorised partial sums). For K <= 2 the two are the same single
rounding; for K > 2 the fp32 sums can differ by a few fp32 ulps, which after the one rounding to bf16
leaves them equal or one bf16 ulp apart (where they straddle a rounding boundary). The kernel is
checked bit for bit against the in-order sum, and against `.sum(dim=1)` within that one ulp.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import qwen3coder.kernels.rmsnorm as rmsnorm_mod  # noqa: E402
import qwen3coder.models.layers.moe as moe_mod  # noqa: E402
import qwen3coder.models.layers.norms as norms_mod  # noqa: E402
from qwen3coder.config import ModelConfig  # noqa: E402
from qwen3coder.kernels.fused_moe import fused_moe  # noqa: E402
from qwen3coder.kernels.rmsnorm import fused_add_rmsnorm  # noqa: E402
from qwen3coder.models import build_model  # noqa: E402
from qwen3coder.models.layers.moe import SparseMoeBlock, TopKPartials, moe_forward_reference, route  # noqa: E402
from qwen3coder.models.layers.norms import RMSNorm  # noqa: E402
from tests.hf_models import MOE_BASE, randomize_  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# compiled on a GPU, Triton's interpreter on CPU: `-m kernels` selects these on the GPU machine
pytestmark = pytest.mark.kernels
# the norm only reads, casts and stores bf16 (arithmetic in fp32): the interpreter runs it in bf16 too
NORM_DTYPES = [torch.float32, torch.bfloat16]
# the grouped GEMMs compute in bf16 (tl.dot), which the interpreter cannot: bf16 MoE on the GPU only
MOE_DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def _norm(h: int, zero_centered: bool, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(h, 1e-6, zero_centered=zero_centered)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h, generator=g) * 0.3 + (0.0 if zero_centered else 1.0))
    return norm.to(DEV, dtype)


def _in_order_sum(partials: torch.Tensor) -> torch.Tensor:
    """Σ_k partials[:, k] in fp32, k = 0, 1, ... (the kernel's order), rounded once."""
    acc = torch.zeros(partials.shape[0], partials.shape[2], dtype=torch.float32, device=partials.device)
    for k in range(partials.shape[1]):
        acc = acc + partials[:, k].float()
    return acc.to(partials.dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units of the last place of their (float) dtype."""
    finfo = torch.finfo(a.dtype)
    larger = torch.maximum(a.float().abs(), b.float().abs()).clamp_min(finfo.tiny)
    _, exponent = torch.frexp(larger)  # larger = m * 2^e, m in [0.5, 1): one ulp is eps * 2^(e - 1)
    ulp = finfo.eps * torch.pow(2.0, (exponent - 1).float())
    return int(((a.float() - b.float()).abs() / ulp).max().ceil().item())


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("hidden", [96, 97])  # 97: odd, not a power of 2 (masked tail of the block)
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_partials_rmsnorm_matches_sum_then_norm(dtype, hidden, k, zero_centered):
    g = torch.Generator().manual_seed(hidden * 10 + k)
    norm = _norm(hidden, zero_centered, dtype, seed=k)
    partials = (torch.randn(7, k, hidden, generator=g) * 0.5).to(DEV, dtype)
    residual = torch.randn(7, hidden, generator=g).to(DEV, dtype)
    out, res = fused_add_rmsnorm(partials, residual, norm.weight, 1e-6, zero_centered)
    assert out.shape == res.shape == (7, hidden) and out.dtype == res.dtype == dtype
    with torch.no_grad():
        # bit for bit: the in-order fp32 sum, rounded once, then the 2-D kernel (itself checked
        # against the PyTorch RMSNorm in tests/test_kernels.py)
        exp_out, exp_res = fused_add_rmsnorm(_in_order_sum(partials), residual, norm.weight, 1e-6, zero_centered)
        assert torch.equal(res, exp_res) and torch.equal(out, exp_out)
        # against the reference norm(x.sum(1).to(dtype) + residual)
        ref_out, ref_res = norm(partials.sum(dim=1).to(dtype), residual)
    if k <= 2:  # one rounding either way: the same sum
        assert torch.equal(res, ref_res)
    elif dtype == torch.bfloat16:  # summation order (module docstring): same or adjacent bf16 values
        assert _ulps(partials.sum(dim=1), _in_order_sum(partials)) <= 1
    tol = 2e-5 if dtype == torch.float32 else 3e-2  # the norm: 1-2 ulps of the output dtype
    assert (out.float() - ref_out.float()).abs().max().item() <= tol * max(1.0, ref_out.float().abs().max().item())
    if dtype == torch.float32:
        assert (res - ref_res).abs().max().item() <= 1e-5 * max(1.0, ref_res.abs().max().item())


def test_partials_need_a_residual_shape_match():
    norm = _norm(16, False, torch.float32)
    partials = torch.randn(3, 2, 16, device=DEV)
    with pytest.raises(AssertionError):
        fused_add_rmsnorm(partials, torch.randn(4, 16, device=DEV), norm.weight, 1e-6)  # N mismatch
    with pytest.raises(AssertionError, match="residual"):
        with torch.no_grad():
            norm(TopKPartials(partials))  # partials without a residual


@pytest.mark.parametrize("dtype", MOE_DTYPES)
@pytest.mark.parametrize("n_tokens, experts, top_k", [(1, 8, 2), (37, 16, 4), (5, 8, 8)])
def test_fused_moe_unreduced_partials(dtype, n_tokens, experts, top_k):
    g = torch.Generator().manual_seed(n_tokens)
    hidden, inter = 64, 32
    x = torch.randn(n_tokens, hidden, generator=g).to(DEV, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(DEV, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(DEV, dtype)
    weights, ids = route(torch.randn(n_tokens, experts, generator=g).to(DEV, dtype), top_k, True, dtype)
    partials = fused_moe(x, w13, w2, weights, ids, reduce=False)
    assert partials.shape == (n_tokens, top_k, hidden) and partials.dtype == dtype
    assert torch.equal(partials.sum(dim=1), fused_moe(x, w13, w2, weights, ids))
    # each partial is w_k · Expert_{id_k}(x)
    for k in range(top_k):
        one = moe_forward_reference(x, w13, w2, weights[:, k:k + 1], ids[:, k:k + 1]).float()
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        assert (partials[:, k].float() - one).abs().max().item() <= tol * max(1.0, one.abs().max().item())


# --- plumbing: who returns partials, who consumes them ------------------------------------------

def _block(shared: int = 0, top_k: int = 2) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(64, 8, top_k, 32, norm_topk_prob=True, shared_expert_intermediate_size=shared)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.15)
    return block.to(DEV)


@pytest.mark.parametrize("triton_path", [False, True])
@pytest.mark.parametrize("shared", [0, 48])
def test_block_returns_partials_only_when_folding(monkeypatch, triton_path, shared):
    """Partials only on the Triton path, with `fold_topk_sum` set and no shared expert (Qwen3-Next's
    shared expert is added to the sum: that block keeps reducing); they sum to the unfolded output."""
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: triton_path and not torch.is_grad_enabled())
    block = _block(shared)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        plain = block(x)
        block.fold_topk_sum = True
        folded = block(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (5, 64)
    if triton_path and shared == 0:
        assert isinstance(folded, TopKPartials) and folded.partials.shape == (5, 2, 64)
        assert torch.equal(folded.reduce(), plain)
    else:
        assert isinstance(folded, torch.Tensor) and torch.equal(folded, plain)
    assert isinstance(block(x), torch.Tensor)  # autograd on (training): always the reference path


def test_rmsnorm_takes_partials_on_both_paths(monkeypatch):
    """RMSNorm hands partials to the kernel on the Triton path and sums them (`reduce()`) elsewhere."""
    norm = _norm(64, False, torch.float32)
    g = torch.Generator().manual_seed(2)
    partials = torch.randn(5, 3, 64, generator=g).to(DEV)
    residual = torch.randn(5, 64, generator=g).to(DEV)
    calls = []
    real = rmsnorm_mod.fused_add_rmsnorm
    monkeypatch.setattr(rmsnorm_mod, "fused_add_rmsnorm", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    with torch.no_grad():
        monkeypatch.setattr(norms_mod, "use_triton", lambda t: True)
        fast = norm(TopKPartials(partials), residual)
        monkeypatch.setattr(norms_mod, "use_triton", lambda t: False)
        slow = norm(TopKPartials(partials), residual)
    assert calls == [(5, 3, 64)]
    assert torch.equal(fast[1], _in_order_sum(partials) + residual)
    assert (fast[0] - slow[0]).abs().max().item() <= 2e-5 * 4


def test_training_dispatch_gives_one_partial(monkeypatch):
    """Experts running a training dispatch (no_grad evaluation on the Triton path) return their sum
    as K = 1 partial, which the next norm takes like any other."""
    from qwen3coder.train.model_utils import install_moe_dispatch

    monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(norms_mod, "use_triton", lambda t: True)
    block = _block()
    block.fold_topk_sum = True
    install_moe_dispatch(block, "dense", torch.device(DEV), log=lambda *a: None)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(DEV)
    residual = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(DEV)
    with torch.no_grad():
        out = block(x)
        assert isinstance(out, TopKPartials) and out.partials.shape == (3, 1, 64)
        _, res = _norm(64, False, torch.float32)(out, residual)
    assert torch.equal(res, out.partials[:, 0] + residual)


# --- the whole model: folded vs unfused ---------------------------------------------------------

def _tiny_moe(dtype: torch.dtype, **overrides) -> torch.nn.Module:
    config = ModelConfig.from_hf({**MOE_BASE, "model_type": "qwen3_moe", **overrides})
    torch.manual_seed(0)
    model = build_model(config).float()
    randomize_(model)
    return model.to(DEV, dtype).eval()


def _set_fold(model: torch.nn.Module, fold: bool) -> int:
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    for b in blocks:
        b.fold_topk_sum = fold
    return len(blocks)


def _logits_folded_and_unfused(model: torch.nn.Module, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(folded logits, unfused logits, shapes of the `x` the add+RMSNorm kernel got with a residual
    in the folded run)."""
    shapes = []
    real = rmsnorm_mod.fused_add_rmsnorm

    def spy(x, residual, *a, **k):
        if residual is not None:  # the decoder's add+norms (QK-norms have no residual)
            shapes.append(tuple(x.shape))
        return real(x, residual, *a, **k)

    monkeypatch.setattr(rmsnorm_mod, "fused_add_rmsnorm", spy)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        assert _set_fold(model, False) == 3
        unfused = model(ids)
        assert all(len(s) == 2 for s in shapes)
        shapes.clear()
        _set_fold(model, True)
        folded = model(ids)
    return folded, unfused, shapes


def test_tiny_model_folded_equals_unfused(monkeypatch):
    """A tiny Qwen3-MoE (3 MoE layers, top-2) with its MoE and norms on the Triton kernels (through the
    interpreter; attention on the reference path): folding the top-k sum into the norms changes no
    logit, and every MoE layer's partials reached a norm (two input_layernorms, the final norm)."""
    monkeypatch.setattr(moe_mod, "use_triton", lambda t: not torch.is_grad_enabled())
    monkeypatch.setattr(norms_mod, "use_triton", lambda t: not torch.is_grad_enabled())
    model = _tiny_moe(torch.float32)
    folded, unfused, shapes = _logits_folded_and_unfused(model, monkeypatch)
    assert shapes.count((18, 2, 64)) == 3
    assert torch.equal(folded, unfused)  # top-2: the same one rounding of p0 + p1
    monkeypatch.undo()  # and both still match the plain-PyTorch reference path
    with torch.no_grad():
        reference = model(torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEV))
    assert (folded - reference).abs().max().item() <= 1e-4 * max(1.0, reference.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [2, 8])
def test_gpu_tiny_model_folded_matches_unfused_bf16(monkeypatch, top_k):
    """On CUDA in bf16 (the real kernels, `use_triton` unpatched). Top-2: the folded sum is torch's
    sum (one rounding of p0 + p1), so the logits are equal. Top-8 (all 8 experts): torch's CUDA sum
    groups the partials differently, so a residual may differ by one bf16 ulp (module docstring) and
    that propagates through the remaining layers: the logits agree to 2% of their range."""
    model = _tiny_moe(torch.bfloat16, num_experts_per_tok=top_k)
    folded, unfused, shapes = _logits_folded_and_unfused(model, monkeypatch)
    assert shapes.count((18, top_k, 64)) == 3
    if top_k == 2:
        assert torch.equal(folded, unfused)
    else:
        scale = unfused.float().abs().max().item()
        assert (folded.float() - unfused.float()).abs().max().item() <= 0.02 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 300])
def test_gpu_partials_rmsnorm_30b_shape(n):
    """Hidden 2048, top-8, bf16: the new residual within one bf16 ulp of `.sum(1) + residual` (equal
    to the in-order sum), the normed output within the bf16 tolerance."""
    g = torch.Generator(DEV).manual_seed(n)
    norm = _norm(2048, False, torch.bfloat16)
    partials = (torch.randn(n, 8, 2048, device=DEV, generator=g) * 0.1).to(torch.bfloat16)
    residual = torch.randn(n, 2048, device=DEV, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        out, res = fused_add_rmsnorm(partials, residual, norm.weight, 1e-6)
        ref_out, ref_res = norm(partials.sum(dim=1), residual)
        exp_out, exp_res = fused_add_rmsnorm(_in_order_sum(partials), residual, norm.weight, 1e-6)
    assert torch.equal(res, exp_res) and torch.equal(out, exp_out)
    assert _ulps(partials.sum(dim=1), _in_order_sum(partials)) <= 1
    assert (out.float() - ref_out.float()).abs().max().item() <= 3e-2 * max(1.0, ref_out.float().abs().max().item())
