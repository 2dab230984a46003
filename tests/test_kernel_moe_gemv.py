"""Decode-row MoE GEMVs (`qwen3coder.kernels.moe_gemv`).

Against the torch statement of the same arithmetic (`moe_gemv_reference`: fp32 dots, act rounded
once, fp32 down dot times the routing weight, rounded once) to an ulp of the output where the fp32
sums, taken in another order, straddle a rounding boundary; deterministic; rows independent; taken
by `fused_moe` only for the shapes `TUNED` lists; through a tiny bf16 model, logits of the torch
path to bf16 rounding. CPU: Triton's interpreter; GPU (`-m gpu`): compiled, at the 30B-A3B shape,
against the grouped GEMMs, with PDL on and off and in CUDA graphs behind the Triton routing (the
down kernel reads the routing before its PDL wait).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import qwen3coder.kernels.moe_gemv as mg  # noqa: E402
from qwen3coder.kernels.gemv import GemvConfig  # noqa: E402
from qwen3coder.models.layers.moe import moe_forward_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SMALL = mg.MoEGemvConfig(GemvConfig(512, 4), GemvConfig(256, 4))  # several programs per expert


def _case(n: int, e: int, h: int, i: int, k: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(DEV, dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(DEV, dtype)
    w2 = (torch.randn(e, h, i, generator=g) * i ** -0.5).to(DEV, dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(DEV, torch.int32)
    wts = torch.softmax(torch.randn(n, k, generator=g), -1).to(DEV, dtype)
    return x, w13, w2, wts, ids


def _close(got: torch.Tensor, ref: torch.Tensor, ulps: int = 2) -> None:
    eps = torch.finfo(got.dtype).eps
    diff = (got.float() - ref.float()).abs()
    assert (diff <= ulps * eps * ref.float().abs() + 1e-3 * ref.float().abs().max()).all(), diff.max().item()


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(n, dtype):
    """H = 48 and I = 40 (padded to 64), 6 experts, top-3; gate/up and down tiles of 4 rows (the last
    program of each partial)."""
    x, w13, w2, wts, ids = _case(n, 6, 48, 40, 3, dtype, seed=n)
    got = mg.moe_gemv(x, w13, w2, wts, ids, SMALL, reduce=False)
    assert got.shape == (n, 3, 48) and got.dtype == dtype
    _close(got, mg.moe_gemv_reference(x, w13, w2, wts, ids))
    assert torch.equal(got, mg.moe_gemv(x, w13, w2, wts, ids, SMALL, reduce=False))  # fixed order
    assert torch.equal(got[:1], mg.moe_gemv(x[:1], w13, w2, wts[:1], ids[:1], SMALL, reduce=False))
    summed = mg.moe_gemv(x, w13, w2, wts, ids, SMALL)
    assert torch.equal(summed, got.sum(dim=1))
    # the model's reference (bf16 matmuls rounding gate and up separately): bf16-rounding agreement
    ref = moe_forward_reference(x, w13, w2, wts, ids.long()).float()
    assert (summed.float() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()


@pytest.mark.parametrize("tiles", [mg.MoEGemvConfig(), mg.MoEGemvConfig(GemvConfig(64, 1), GemvConfig(64, 1))],
                         ids=["default", "one-row"])
def test_tiles_do_not_change_the_result(tiles):
    """Every tile computes each output from the same fp32 products summed over the whole K in one
    `tl.sum`; the tile changes which rows a program owns, not the values (a row never spans programs)."""
    x, w13, w2, wts, ids = _case(1, 5, 32, 24, 2, torch.bfloat16, seed=7)
    _close(mg.moe_gemv(x, w13, w2, wts, ids, tiles, reduce=False), mg.moe_gemv_reference(x, w13, w2, wts, ids))


def test_rejects_bad_input():
    x, w13, w2, wts, ids = _case(mg.MAX_ROWS + 1, 4, 32, 16, 2, torch.bfloat16, seed=0)
    with pytest.raises(AssertionError):
        mg.moe_gemv(x, w13, w2, wts, ids)
    with pytest.raises(AssertionError):
        mg.moe_gemv(x[:1], w13, w2.transpose(1, 2), wts[:1], ids[:1])


def test_policy(monkeypatch):
    x, w13, _, _, _ = _case(1, 4, 32, 16, 2, torch.bfloat16, seed=0)
    monkeypatch.setattr(mg, "TUNED", {(1, 32, 16): SMALL})
    assert mg.moe_gemv_config(1, x, w13) == SMALL
    assert mg.moe_gemv_config(2, x, w13) is None  # rows not listed
    assert mg.moe_gemv_config(1, x.float(), w13.float()) is None
    assert mg.moe_gemv_config(1, x, w13[:, :16]) is None  # another intermediate size
    assert mg.moe_gemv_config(1, x.to("meta"), w13.to("meta")) is None
    mg.set_moe_gemv_enabled(False)
    try:
        assert mg.moe_gemv_config(1, x, w13) is None
    finally:
        mg.set_moe_gemv_enabled(True)


def test_fused_moe_takes_it_for_listed_shapes_only(monkeypatch):
    from qwen3coder.kernels import fused_moe as fm

    x, w13, w2, wts, ids = _case(1, 4, 32, 16, 2, torch.bfloat16, seed=3)
    calls = []
    real = mg.moe_gemv
    monkeypatch.setattr(fm, "moe_gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setattr(mg, "TUNED", {(1, 32, 16): SMALL})
    out = fm.fused_moe(x, w13, w2, wts, ids, reduce=False)
    assert calls == [(1, 32)]
    assert torch.equal(out, real(x, w13, w2, wts, ids, SMALL, reduce=False))
    fm.fused_moe(x.float(), w13.float(), w2.float(), wts.float(), ids.long())  # fp32: the grouped GEMMs
    assert len(calls) == 1


@pytest.mark.parametrize("rows", [1, 3])
def test_model_forward_through_the_moe_gemv(monkeypatch, rows):
    """A tiny bf16 Qwen3-MoE with its MoE shape listed for 1..4 rows, on the Triton path: every layer
    takes the GEMVs, and the logits match the torch path's to bf16 rounding."""
    from qwen3coder.config import ModelConfig
    from qwen3coder.loader import build_dummy_model
    from qwen3coder.models.layers import moe as moe_mod

    cfg = ModelConfig.preset("tiny")
    model = build_dummy_model(cfg, DEV, torch.bfloat16, seed=0)
    ids = torch.randint(0, 512, (1, rows), generator=torch.Generator().manual_seed(rows)).to(DEV)
    experts = model.model.layers[0].mlp.experts
    h, i = experts.gate_up_proj.shape[2], experts.intermediate_size
    with torch.no_grad():
        monkeypatch.setattr(moe_mod, "use_triton", lambda t: False)
        expected = model(ids).float()
        monkeypatch.setattr(moe_mod, "use_triton", lambda t: True)
        calls = []
        real = mg.moe_gemv
        from qwen3coder.kernels import fused_moe as fm
        monkeypatch.setattr(fm, "moe_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        monkeypatch.setattr(mg, "TUNED", {(r, h, i): SMALL for r in range(1, mg.MAX_ROWS + 1)})
        got = model(ids).float()
    assert len(calls) == cfg.num_hidden_layers
    assert (got - expected).abs().max().item() <= 2 ** -5 * expected.abs().max().item()


# ------------------------------------------------------------------ GPU
H30, I30, E30, K30 = 2048, 768, 128, 8
GPU_TILES = [mg.MoEGemvConfig(), mg.MoEGemvConfig(GemvConfig(32768, 8), GemvConfig(16384, 8)),
             mg.MoEGemvConfig(GemvConfig(8192, 4), GemvConfig(4096, 4))]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("tiles", GPU_TILES, ids=str)
def test_gpu_30b_shape(n, tiles):
    """bf16 at the 30B-A3B MoE shape: the reference to an ulp or two, the grouped GEMMs to bf16 rounding."""
    from qwen3coder.kernels.fused_moe import MoETiles, fused_moe

    x, w13, w2, wts, ids = _case(n, E30, H30, I30, K30, torch.bfloat16, seed=n)
    got = mg.moe_gemv(x, w13, w2, wts, ids, tiles, reduce=False)
    _close(got, mg.moe_gemv_reference(x, w13, w2, wts, ids))
    grouped = fused_moe(x, w13, w2, wts, ids.long(), tiles=MoETiles(), reduce=False)
    _close(got, grouped, ulps=4)


@pytest.mark.gpu
def test_gpu_graph_replay_behind_the_routing_kernel():
    """The down kernel reads the routing before its PDL wait: in a CUDA graph whose routing kernel
    (Triton, PDL) runs right before, replays with new router logits each time give the eager result
    of those logits, with PDL on and off."""
    from qwen3coder.kernels import pdl
    from qwen3coder.kernels.moe_routing import route_align

    x, w13, w2, _, _ = _case(1, E30, H30, I30, K30, torch.bfloat16, seed=1)
    logits = torch.empty(1, E30, dtype=torch.bfloat16, device=DEV)

    def step():
        r = route_align(logits, K30, True, 16, x.dtype)
        return mg.moe_gemv(x, w13, w2, r.topk_weights, r.topk_ids, mg.MoEGemvConfig(), reduce=False)

    g = torch.Generator(device=DEV).manual_seed(0)
    for enabled in (True, False):
        pdl.set_pdl_enabled(enabled)
        try:
            logits.copy_(torch.randn(1, E30, generator=g, device=DEV))
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            for _ in range(20):
                logits.copy_(torch.randn(1, E30, generator=g, device=DEV))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, step())
        finally:
            pdl.set_pdl_enabled(True)


def test_default_table_lists_the_30b_moe_at_batch_1_and_2():
    assert set(mg.TUNED) == {(1, 2048, 768), (2, 2048, 768)}
    assert all(rows <= mg.MAX_ROWS for rows, _, _ in mg.TUNED)
